//! The keyset strategy: walk the primary key once, a range of consecutive keys per
//! transaction, and fill the NULL jobset_id rows found there. Also the final sweep of the
//! per-page strategy (rows that concurrent writers moved out of pages already walked).
//! Orphan rows (no jobset with their project/name) are skipped and counted, so the walk
//! always ends.

use anyhow::{Context, Result};
use postgres::GenericClient;
use serde::{Deserialize, Serialize};

use super::Table;

/// Builds: the ids `($1, $2]`, a span computed by the caller. Only NULL rows are read
/// into the batch; the span bounds the scan, so a mostly-filled range stays cheap.
/// The update looks its rows up by the batch's ids: joined to the batch instead, the
/// planner (its statistics still saying every jobset_id is NULL) merge-joined it with a
/// scan of the whole primary key from the lowest id, so every batch read Builds from the
/// start, and the walk took time quadratic in its size.
///
/// Only the rows it can lock at once are updated; the ones another transaction holds
/// are listed for later (`held`), so a batch never waits for a row lock. (A row
/// filled and committed by someone else after the batch's snapshot is listed too; its
/// later fill finds nothing to do.)
const BUILDS_BATCH: &str = "
WITH batch AS (
    SELECT id FROM builds
     WHERE id > $1 AND id <= $2 AND jobset_id IS NULL
), locked AS (
    SELECT id FROM builds
     WHERE id = ANY (ARRAY(SELECT id FROM batch)) AND jobset_id IS NULL
       FOR NO KEY UPDATE SKIP LOCKED
), upd AS (
    UPDATE builds AS t SET jobset_id = js.id
      FROM jobsets js
     WHERE t.id = ANY (ARRAY(SELECT id FROM locked)) AND t.jobset_id IS NULL
       AND js.project = t.project AND js.name = t.jobset
    RETURNING 1
), held AS (
    INSERT INTO hydra_upgrade.held_builds (id)
    SELECT id FROM batch WHERE id <> ALL (ARRAY(SELECT id FROM locked))
    ON CONFLICT DO NOTHING
)
SELECT (SELECT count(*) FROM locked), (SELECT count(*) FROM upd)";

/// Jobs: the next `$4` keys of the primary key (project, jobset, name) after the cursor.
/// As for Builds, rows another transaction holds are listed for later, not waited for.
const JOBS_BATCH: &str = "
WITH batch AS (
    SELECT project, jobset, name, jobset_id IS NULL AS pending FROM jobs
     WHERE $1::text IS NULL OR (project, jobset, name) > ($1, $2, $3)
     ORDER BY project, jobset, name
     LIMIT $4
), locked AS (
    SELECT t.project, t.jobset, t.name FROM jobs AS t
      JOIN batch b ON b.project = t.project AND b.jobset = t.jobset AND b.name = t.name
     WHERE b.pending AND t.jobset_id IS NULL
       FOR NO KEY UPDATE OF t SKIP LOCKED
), upd AS (
    UPDATE jobs AS t SET jobset_id = js.id
      FROM locked l, jobsets js
     WHERE t.project = l.project AND t.jobset = l.jobset AND t.name = l.name
       AND t.jobset_id IS NULL AND js.project = t.project AND js.name = t.jobset
    RETURNING 1
), held AS (
    INSERT INTO hydra_upgrade.held_jobs (project, jobset, name)
    SELECT project, jobset, name FROM batch WHERE pending
    EXCEPT SELECT project, jobset, name FROM locked
    ON CONFLICT DO NOTHING
), last AS (
    SELECT project, jobset, name FROM batch ORDER BY project DESC, jobset DESC, name DESC LIMIT 1
)
SELECT (SELECT project FROM last), (SELECT jobset FROM last), (SELECT name FROM last),
       (SELECT count(*) FROM batch), (SELECT count(*) FROM locked), (SELECT count(*) FROM upd)";

/// Where a keyset walk stands; saved as JSON in the progress table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cursor {
    /// Builds: last id done; the walk ends at `upper`.
    Id { after: i64, upper: i64 },
    /// Jobs: last primary key done (`None` before the first batch).
    Key {
        after: Option<(String, String, String)>,
    },
}

impl Cursor {
    pub fn start(c: &mut impl GenericClient, table: Table) -> Result<Cursor> {
        Ok(match table {
            Table::Builds => {
                let upper: i32 = c
                    .query_one("SELECT coalesce(max(id), 0) FROM builds", &[])
                    .context("reading the highest build id")?
                    .get(0);
                Cursor::Id {
                    after: 0,
                    upper: upper.into(),
                }
            }
            Table::Jobs => Cursor::Key { after: None },
        })
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Batch {
    /// Keys walked (Jobs) or ids spanned (Builds).
    pub walked: u64,
    pub updated: u64,
    /// NULL rows left as they were: orphans (or rows a concurrent writer just filled).
    pub skipped: u64,
    pub done: bool,
}

/// One batch of `size` keys from `cursor`; advances the cursor.
pub fn batch(c: &mut impl GenericClient, cursor: &mut Cursor, size: u64) -> Result<Batch> {
    let size = size.max(1) as i64;
    match cursor {
        Cursor::Id { after, upper } => {
            if *after >= *upper {
                return Ok(Batch {
                    done: true,
                    ..Batch::default()
                });
            }
            let next = after.saturating_add(size).min(*upper);
            let (lo, hi) = (i32::try_from(*after)?, i32::try_from(next)?);
            let row = c
                .query_one(BUILDS_BATCH, &[&lo, &hi])
                .context("running a keyset batch on Builds")?;
            let (locked, updated): (i64, i64) = (row.get(0), row.get(1));
            let walked = (next - *after) as u64;
            *after = next;
            Ok(Batch {
                walked,
                updated: updated as u64,
                skipped: (locked - updated).max(0) as u64,
                done: next >= *upper,
            })
        }
        Cursor::Key { after } => {
            let (p, j, n) = match after {
                Some((p, j, n)) => (Some(p.as_str()), Some(j.as_str()), Some(n.as_str())),
                None => (None, None, None),
            };
            let row = c
                .query_one(JOBS_BATCH, &[&p, &j, &n, &size])
                .context("running a keyset batch on Jobs")?;
            let last: (Option<String>, Option<String>, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            let (walked, locked, updated): (i64, i64, i64) = (row.get(3), row.get(4), row.get(5));
            if let (Some(p), Some(j), Some(n)) = last {
                *after = Some((p, j, n));
            }
            Ok(Batch {
                walked: walked as u64,
                updated: updated as u64,
                skipped: (locked - updated).max(0) as u64,
                done: walked < size,
            })
        }
    }
}
