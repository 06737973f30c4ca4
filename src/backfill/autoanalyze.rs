//! Holding off autoanalyze of Jobs and Builds while the backfill walks them.
//!
//! An ANALYZE holds a snapshot for as long as it runs, and while it does no dead row
//! version newer than that snapshot can be pruned: the walk's updates stop being HOT and
//! Builds grows. The walk's own updates trigger autoanalyze (every 10 % of the rows
//! changed). On PostgreSQL 11 and older autovacuum is throttled by a 20 ms cost delay
//! (2 ms from 12), so one autoanalyze of a 1M-row Builds held the horizon for about 40 s:
//! the benchmark measured 68 % HOT and +26 % growth there, 94 % and +4.6 % with the delay
//! at 2 ms (BENCHMARKS.md). Statistics taken in the middle of the backfill describe a
//! column that is still changing anyway.
//!
//! Jobs' autoanalyze, triggered by its own walk, holds the same horizon while Builds is
//! walked after it (about a second a run on 11 at 1M builds).
//!
//! So for the walk each table's `autovacuum_analyze_threshold` is set to a value of our own
//! ([`HOLD_OFF`]), and reset when the backfill ends, fails or is interrupted; a run killed
//! outright leaves it, and the next `backfill` or `finalize` resets it (the value marks it
//! as ours), and so do `backfill`, `finalize` and `upgrade` when they find both columns NOT
//! NULL already (nothing left for them to do: the admin finished with Hydra's own
//! `hydra-init`). A table whose owner set the option already is left alone. Autovacuum's
//! VACUUM is not held off: it does not hold back pruning.

use anyhow::Result;

use super::Table;
use crate::db::{self, Db};
use crate::progress::Out;

/// The threshold that marks the option as set by hydra-upgrade: no table reaches it.
pub const HOLD_OFF: &str = "2000000000";

/// The table's `autovacuum_analyze_threshold` storage option, if set.
fn current(db: &mut Db, table: Table) -> Result<Option<String>> {
    let row = db.client().query_opt(
        "SELECT option_value FROM pg_options_to_table(
                    (SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)))
          WHERE option_name = 'autovacuum_analyze_threshold'",
        &[&table.name()],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// Hold off autoanalyze of `table` (kept if an earlier run's marker is still there).
/// Best effort: without the privilege (only the owner may) or the lock, it warns and the
/// walk goes on.
pub fn hold_off(db: &mut Db, table: Table, out: &Out) -> Result<()> {
    let name = table.name();
    match current(db, table)?.as_deref() {
        Some(HOLD_OFF) => return Ok(()),
        Some(theirs) => {
            out.say(&format!(
                "{name}: autovacuum_analyze_threshold is set ({theirs}); leaving it as it is"
            ));
            return Ok(());
        }
        None => {}
    }
    let sql = format!("ALTER TABLE {name} SET (autovacuum_analyze_threshold = {HOLD_OFF})");
    match db.client().batch_execute(&sql) {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = anyhow::Error::from(e);
            if db::sqlstate(&e).is_none() {
                return Err(e);
            }
            out.warn(&format!(
                "{name}: could not hold off autoanalyze during the walk ({e:#}); an \
                 autoanalyze that runs meanwhile makes some updates non-HOT"
            ));
            Ok(())
        }
    }
}

/// The tables whose autoanalyze is held off by hydra-upgrade right now: during a
/// backfill, or left by one killed outright.
pub fn held_off(db: &mut Db) -> Result<Vec<Table>> {
    let mut tables = Vec::new();
    for table in Table::ALL {
        if current(db, table)?.as_deref() == Some(HOLD_OFF) {
            tables.push(table);
        }
    }
    Ok(tables)
}

/// [`release`] at a stage with nothing left to backfill or finalize: a marker found there
/// was left by a run killed outright. Best effort, and waits at most 2 s for the table's
/// lock (a manual VACUUM or ANALYZE holds it), then warns.
pub fn release_left_over(db: &mut Db, out: &Out) -> Result<()> {
    db.client().batch_execute("SET lock_timeout = 2000")?;
    let released = release(db, out, false);
    db.client().batch_execute("RESET lock_timeout")?;
    released
}

/// Reset the option where it is ours. `must`: fail when it cannot be reset (finalize,
/// which promises Hydra's exact catalog); else warn that the next run resets it.
pub fn release(db: &mut Db, out: &Out, must: bool) -> Result<()> {
    for table in held_off(db)? {
        let name = table.name();
        let sql = format!("ALTER TABLE {name} RESET (autovacuum_analyze_threshold)");
        if let Err(e) = db.client().batch_execute(&sql) {
            let e = anyhow::Error::from(e)
                .context(format!("resetting {name}'s autovacuum_analyze_threshold"));
            if must {
                return Err(e);
            }
            out.warn(&format!(
                "{e:#}; the next `hydra-upgrade backfill` or `finalize` resets it"
            ));
        }
    }
    Ok(())
}
