//! The two baselines the benchmark compares ours against, written from HYDRA-FACTS.md:
//!
//! - one offline `UPDATE ... FROM jobsets` per table (what an admin with a maintenance
//!   window would type);
//! - a re-enactment of the stock `hydra-backfill-ids` algorithm: database-wide `VACUUM`
//!   at the start, every 500 batches and at the end; Jobs by repeating an `UPDATE` of the
//!   rows `IN (the first 10,000 rows WHERE jobset_id IS NULL)` until nothing changes;
//!   Builds by a keyset walk that starts at the lowest NULL id, takes the next 10,000 NULL
//!   rows from the cursor, returns their ids and moves the cursor to the highest; both
//!   tables twice, first with `FOR UPDATE SKIP LOCKED` in the row selection, then without.
//!   Each statement commits on its own (DBI's AutoCommit), with the server's default
//!   `synchronous_commit`, as the Perl script runs.

use anyhow::{Context, Result};

use crate::db::Db;

/// Rows per batch of the stock script.
pub const STOCK_BATCH: i64 = 10_000;
/// The stock script vacuums the whole database after this many batches.
pub const STOCK_VACUUM_EVERY: u64 = 500;

const OFFLINE_JOBS: &str = "UPDATE jobs SET jobset_id = js.id FROM jobsets js
 WHERE js.project = jobs.project AND js.name = jobs.jobset AND jobs.jobset_id IS NULL";
const OFFLINE_BUILDS: &str = "UPDATE builds SET jobset_id = js.id FROM jobsets js
 WHERE js.project = builds.project AND js.name = builds.jobset AND builds.jobset_id IS NULL";

/// One offline UPDATE per table, each its own transaction.
pub fn offline(db: &mut Db) -> Result<()> {
    let c = db.client();
    c.batch_execute(OFFLINE_JOBS)
        .context("offline UPDATE of jobs")?;
    c.batch_execute(OFFLINE_BUILDS)
        .context("offline UPDATE of builds")?;
    Ok(())
}

fn lock_clause(skip_locked: bool) -> &'static str {
    if skip_locked {
        "FOR UPDATE SKIP LOCKED"
    } else {
        ""
    }
}

fn stock_jobs_sql(skip_locked: bool) -> String {
    format!(
        "UPDATE jobs SET jobset_id =
             (SELECT js.id FROM jobsets js WHERE js.name = jobs.jobset AND js.project = jobs.project)
          WHERE (jobs.project, jobs.jobset, jobs.name) IN
             (SELECT j.project, j.jobset, j.name FROM jobs j
               WHERE j.jobset_id IS NULL {} LIMIT $1)",
        lock_clause(skip_locked)
    )
}

fn stock_builds_sql(skip_locked: bool) -> String {
    format!(
        "WITH done AS (
             UPDATE builds SET jobset_id =
                 (SELECT js.id FROM jobsets js WHERE js.name = builds.jobset AND js.project = builds.project)
              WHERE builds.id IN
                 (SELECT b.id FROM builds b
                   WHERE b.jobset_id IS NULL AND b.id >= $1
                   ORDER BY b.id {} LIMIT $2)
             RETURNING builds.id)
         SELECT count(*), max(id) FROM done",
        lock_clause(skip_locked)
    )
}

/// What the stock re-enactment did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StockCounts {
    pub batches: u64,
    pub vacuums: u64,
}

fn vacuum(db: &mut Db, counts: &mut StockCounts) -> Result<()> {
    db.client()
        .batch_execute("VACUUM")
        .context("database-wide VACUUM")?;
    counts.vacuums += 1;
    Ok(())
}

fn stock_jobs(db: &mut Db, skip_locked: bool, counts: &mut StockCounts) -> Result<()> {
    let sql = stock_jobs_sql(skip_locked);
    let mut iteration = 0u64;
    loop {
        iteration += 1;
        let affected = db
            .client()
            .execute(&sql, &[&STOCK_BATCH])
            .context("stock Jobs batch")?;
        counts.batches += 1;
        if iteration.is_multiple_of(STOCK_VACUUM_EVERY) {
            vacuum(db, counts)?;
        }
        if affected == 0 {
            return Ok(());
        }
    }
}

fn stock_builds(db: &mut Db, skip_locked: bool, counts: &mut StockCounts) -> Result<()> {
    let lowest: Option<i32> = db
        .client()
        .query_opt(
            "SELECT id FROM builds WHERE jobset_id IS NULL ORDER BY id LIMIT 1",
            &[],
        )?
        .map(|r| r.get(0));
    let Some(mut cursor) = lowest else {
        return Ok(());
    };
    let sql = stock_builds_sql(skip_locked);
    let mut iteration = 0u64;
    loop {
        iteration += 1;
        let row = db
            .client()
            .query_one(&sql, &[&cursor, &STOCK_BATCH])
            .context("stock Builds batch")?;
        counts.batches += 1;
        let (affected, highest): (i64, Option<i32>) = (row.get(0), row.get(1));
        if iteration.is_multiple_of(STOCK_VACUUM_EVERY) {
            vacuum(db, counts)?;
        }
        match highest {
            Some(h) if affected > 0 => cursor = h,
            _ => return Ok(()),
        }
    }
}

/// The whole stock algorithm, in its order.
pub fn stock(db: &mut Db) -> Result<StockCounts> {
    let mut counts = StockCounts::default();
    vacuum(db, &mut counts)?;
    for skip_locked in [true, false] {
        stock_jobs(db, skip_locked, &mut counts)?;
        stock_builds(db, skip_locked, &mut counts)?;
    }
    vacuum(db, &mut counts)?;
    Ok(counts)
}
