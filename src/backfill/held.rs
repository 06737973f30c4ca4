//! Rows another transaction held locked when the walk came to them.
//!
//! No batch of ours waits long for a row lock: a keyset batch locks its rows with `SKIP
//! LOCKED` first and updates only those; a per-page round gives up a row lock wait after
//! 50 ms and is done again that way (`per_page::update_round`). Hydra holds rows for a
//! long time now and then: `hydra-eval-jobset` opens its database transaction by
//! clearing `isCurrent` on every current build of the jobset and keeps those rows until
//! its evaluation is stored (minutes for a large jobset), and it writes Jobs rows in the
//! same transaction. A batch that waited for one of them held the rows it had already
//! updated meanwhile, up to `lock_timeout` per try: Hydra's queue runner waited behind us
//! to finish those builds, and had the evaluator then wanted one of them, the two would
//! have deadlocked, and PostgreSQL cancels whichever waited first, which can be the
//! evaluator's transaction.
//!
//! A row the per-page walk skips is still NULL when the keyset sweep comes to it; a row
//! the keyset walk skips is written down here, in the batch's own transaction. Once the
//! walk has ended, those rows are filled one per transaction, each waiting for its lock
//! (under `lock_timeout`, at most half the `statement_timeout`; retried): a transaction
//! of ours that waits holds no other row, so it delays no one but the row's own next
//! writer, and can be in no deadlock. The list is kept in the database, so a re-run after
//! the retries ran out fills just these rows.

use std::time::Duration;

use anyhow::{Context, Result};
use postgres::GenericClient;

use super::Table;
use crate::db::Db;

const CREATE: &str = "
CREATE TABLE IF NOT EXISTS hydra_upgrade.held_builds (id integer PRIMARY KEY);
CREATE TABLE IF NOT EXISTS hydra_upgrade.held_jobs (
    project text, jobset text, name text, PRIMARY KEY (project, jobset, name)
)";

/// The lists (in the progress schema, which `finalize` drops).
pub fn ensure(db: &mut Db) -> Result<()> {
    db.client()
        .batch_execute(CREATE)
        .context("creating the lists of rows held by other transactions in schema hydra_upgrade")
}

/// The table of `table`'s held rows.
pub fn list(table: Table) -> &'static str {
    match table {
        Table::Builds => "hydra_upgrade.held_builds",
        Table::Jobs => "hydra_upgrade.held_jobs",
    }
}

/// How many of `table`'s rows are listed.
pub fn count(c: &mut impl GenericClient, table: Table) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM {}", list(table));
    Ok(c.query_one(&sql, &[])
        .with_context(|| format!("counting the held rows of {}", table.name()))?
        .get(0))
}

/// How many of `table`'s rows are listed; 0 where no list was ever made (no backfill
/// yet, or one by a version of hydra-upgrade before the lists).
pub fn listed(c: &mut impl GenericClient, table: Table) -> Result<i64> {
    if crate::db::relation_exists(c, list(table))? {
        count(c, table)
    } else {
        Ok(0)
    }
}

/// List the fillable NULL rows of `table` (joined with Jobsets: orphans are left out)
/// when there are at most `max`, in one read of the table; `None` when there are more
/// (nothing is listed then). After a finished walk the NULL rows left are few (an older
/// evaluator's, written while it still ran), and filling them by key spares a walk of
/// the whole table. With none or few left this reads all of it, longer than the
/// backfill's statement_timeout at tens of millions of builds; it blocks nothing, so it
/// runs without that limit.
pub fn list_nulls(db: &mut Db, table: Table, max: i64) -> Result<Option<i64>> {
    let keys = match table {
        Table::Builds => "t.id",
        Table::Jobs => "t.project, t.jobset, t.name",
    };
    let sql = format!(
        "INSERT INTO {list} SELECT {keys} FROM {rows} LIMIT $1 ON CONFLICT DO NOTHING",
        list = list(table),
        rows = super::fillable_rows(table)
    );
    let context = || format!("listing the NULL rows of {}", table.name());
    let mut tx = db
        .transaction_without_statement_timeout()
        .with_context(context)?;
    let n = tx.execute(&sql, &[&(max + 1)]).with_context(context)?;
    let n = i64::try_from(n)?;
    if n > max {
        tx.rollback().with_context(context)?;
        return Ok(None);
    }
    tx.commit().with_context(context)?;
    Ok(Some(n))
}

/// One listed row, by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Build(i32),
    Job(String, String, String),
}

/// The first listed row of `table`, if any.
pub fn first(c: &mut impl GenericClient, table: Table) -> Result<Option<Key>> {
    let context = || format!("reading the held rows of {}", table.name());
    Ok(match table {
        Table::Builds => c
            .query_opt(
                "SELECT id FROM hydra_upgrade.held_builds ORDER BY id LIMIT 1",
                &[],
            )
            .with_context(context)?
            .map(|r| Key::Build(r.get(0))),
        Table::Jobs => c
            .query_opt(
                "SELECT project, jobset, name FROM hydra_upgrade.held_jobs
                  ORDER BY project, jobset, name LIMIT 1",
                &[],
            )
            .with_context(context)?
            .map(|r| Key::Job(r.get(0), r.get(1), r.get(2))),
    })
}

/// What filling one held row came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    Updated,
    /// Still NULL: it matches no jobset.
    Orphan,
    /// Filled meanwhile by someone else (Hydra's own evaluator), or gone.
    Already,
}

const FILL_BUILD: &str = "
UPDATE builds AS t SET jobset_id = js.id FROM jobsets js
 WHERE t.id = $1 AND t.jobset_id IS NULL AND js.project = t.project AND js.name = t.jobset";
const STILL_NULL_BUILD: &str =
    "SELECT EXISTS (SELECT 1 FROM builds WHERE id = $1 AND jobset_id IS NULL)";
const UNLIST_BUILD: &str = "DELETE FROM hydra_upgrade.held_builds WHERE id = $1";

const FILL_JOB: &str = "
UPDATE jobs AS t SET jobset_id = js.id FROM jobsets js
 WHERE (t.project, t.jobset, t.name) = ($1, $2, $3) AND t.jobset_id IS NULL
   AND js.project = t.project AND js.name = t.jobset";
const STILL_NULL_JOB: &str = "SELECT EXISTS (SELECT 1 FROM jobs
 WHERE (project, jobset, name) = ($1, $2, $3) AND jobset_id IS NULL)";
const UNLIST_JOB: &str =
    "DELETE FROM hydra_upgrade.held_jobs WHERE (project, jobset, name) = ($1, $2, $3)";

/// How long a held row's fill waits for its lock, from the session's `lock_timeout` and
/// `statement_timeout` (0: none): the `lock_timeout`, but at most half the
/// `statement_timeout`. A wait that ran into the statement timeout instead was taken for
/// a server too slow for a batch of one (exit 1, "raise --statement-timeout-ms"); ended
/// by the lock timeout it is what it is, lock contention: retried, then exit 14 with the
/// row left listed for the re-run.
pub fn row_wait(lock_timeout: Duration, statement_timeout: Duration) -> Duration {
    let half = if statement_timeout.is_zero() {
        Duration::ZERO
    } else {
        (statement_timeout / 2).max(Duration::from_millis(1))
    };
    crate::db::shorter_timeout(lock_timeout, half)
}

/// Fill one held row and take it off the list, in the caller's transaction (which saves
/// the progress with it). The update waits for the row's lock at most `wait` (see
/// [`row_wait`]); the transaction has written nothing before it, so it holds no other
/// row meanwhile.
pub fn fill(tx: &mut impl GenericClient, key: &Key, wait: Duration) -> Result<Filled> {
    tx.batch_execute(&crate::db::local_lock_timeout(wait))
        .context("setting the held row's lock_timeout")?;
    let (updated, still_null) = match key {
        Key::Build(id) => {
            let n = tx.execute(FILL_BUILD, &[id])?;
            let still = n == 0 && tx.query_one(STILL_NULL_BUILD, &[id])?.get::<_, bool>(0);
            tx.execute(UNLIST_BUILD, &[id])?;
            (n, still)
        }
        Key::Job(project, jobset, name) => {
            let n = tx.execute(FILL_JOB, &[project, jobset, name])?;
            let still = n == 0
                && tx
                    .query_one(STILL_NULL_JOB, &[project, jobset, name])?
                    .get::<_, bool>(0);
            tx.execute(UNLIST_JOB, &[project, jobset, name])?;
            (n, still)
        }
    };
    Ok(match (updated, still_null) {
        (0, true) => Filled::Orphan,
        (0, false) => Filled::Already,
        _ => Filled::Updated,
    })
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Build(id) => write!(f, "id {id}"),
            Key::Job(project, jobset, name) => write!(f, "{project}:{jobset}:{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::row_wait;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_held_rows_wait_ends_before_the_statement_timeout() {
        // The defaults: the lock_timeout, well under the statement_timeout.
        assert_eq!(row_wait(ms(2_000), ms(30_000)), ms(2_000));
        // A lock_timeout at or above the statement_timeout, or none at all: half of it.
        assert_eq!(row_wait(ms(5_000), ms(300)), ms(150));
        assert_eq!(row_wait(ms(300), ms(300)), ms(150));
        assert_eq!(row_wait(ms(0), ms(300)), ms(150));
        // No statement_timeout: the lock_timeout, even none.
        assert_eq!(row_wait(ms(2_000), ms(0)), ms(2_000));
        assert_eq!(row_wait(ms(0), ms(0)), ms(0));
        // Never 0 (none) from a tiny statement_timeout.
        assert_eq!(row_wait(ms(0), ms(1)), ms(1));
    }
}
