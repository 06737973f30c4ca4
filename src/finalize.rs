//! The final phase, online. Stock upgrade-62/63 run `SET NOT NULL`, which scans Builds
//! under an ACCESS EXCLUSIVE lock, and upgrade-64/65 build two indexes under a SHARE lock
//! that blocks every write, all inside hydra-init's transactions. Here the same end state
//! is reached with only short locks, while the migration package keeps serving:
//!
//! 1. per table: `ADD CONSTRAINT ... CHECK (jobset_id IS NOT NULL) NOT VALID` (short lock),
//!    `VALIDATE CONSTRAINT` (scans under SHARE UPDATE EXCLUSIVE: writes go on), then one
//!    short transaction: `SET NOT NULL` (PostgreSQL >= 12 skips the scan, the valid CHECK
//!    proves it), drop the helper constraint, `SchemaVersion` = 62 / 63;
//! 2. both indexes with `CREATE INDEX CONCURRENTLY` under temporary names (an invalid
//!    leftover of an interrupted attempt is dropped and rebuilt), then one short
//!    transaction renames them to Hydra's names and sets `SchemaVersion` = 65.
//!
//! Every short step runs under a small `lock_timeout`, retried with backoff, so Hydra's
//! writes never queue behind us for longer than that. Before each long online step it
//! waits while a standby is far behind (`--max-replication-lag-mb`,
//! [`crate::backfill::replication`]): an index build logs its whole index. Each step
//! checks what is already done, so an interrupted finalize simply runs again. The result
//! is the catalog Hydra's own upgrade files produce (the tests diff them), and the final
//! package's hydra-init finds nothing left to do.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postgres::error::SqlState;
use serde::Serialize;

use crate::backfill::replication::{self, LagWatch, Waiter};
use crate::backfill::{Table, state};
use crate::cli::FinalizeArgs;
use crate::config::Config;
use crate::db::{self, Db};
use crate::exit::{Exit, Failure, fail};
use crate::hydra_schema::step_sql;
use crate::interrupt::Interrupt;
use crate::progress::Out;

/// lock_timeout of each short write-blocking step: while we wait for the lock, Hydra's
/// writes queue behind us, so this bounds how long they can be held up (plus the step
/// itself, about a millisecond).
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 500;

/// How often a short step is retried on lock timeout before giving up.
pub const DEFAULT_MAX_RETRIES: u32 = 30;

#[derive(Debug, Clone)]
pub struct Options {
    pub lock_timeout: Duration,
    pub max_retries: u32,
    /// The watch on standbys before each long online step.
    pub replication: replication::Settings,
}

impl Options {
    /// The options `hydra-upgrade finalize` runs with when neither a knob nor the
    /// configuration file sets one.
    pub fn defaults() -> Options {
        Options {
            lock_timeout: Duration::from_millis(DEFAULT_LOCK_TIMEOUT_MS),
            max_retries: DEFAULT_MAX_RETRIES,
            replication: replication::Settings::default(),
        }
    }

    pub fn from_args(a: &FinalizeArgs, config: &Config) -> Options {
        Options {
            lock_timeout: Duration::from_millis(a.lock_timeout_ms),
            max_retries: a.max_retries,
            replication: replication::Settings::from_args(&a.replication, config),
        }
    }
}

/// One step of the final phase: for a write-blocking step, how long it held (or queued
/// for) a lock that blocks Hydra's writes to the table.
#[derive(Debug, Clone, Serialize)]
pub struct LockStep {
    pub step: String,
    pub seconds: f64,
    /// When it began, in seconds since the final phase began.
    pub at: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Steps whose locks block writes (ACCESS EXCLUSIVE), with how long each took.
    pub blocking_steps: Vec<LockStep>,
    /// Online steps (writes go on): VALIDATE, CREATE INDEX CONCURRENTLY.
    pub online_steps: Vec<LockStep>,
    pub seconds: f64,
    /// Time spent waiting for a standby or subscriber before the online steps.
    pub replication_wait_seconds: f64,
    /// When the final phase began (what `LockStep::at` counts from).
    #[serde(skip)]
    pub began: Option<Instant>,
}

impl Report {
    /// Seconds from the start of the final phase to `t`.
    fn since_start(&self, t: Instant) -> f64 {
        self.began
            .map_or(0.0, |b| t.saturating_duration_since(b).as_secs_f64())
    }

    pub fn longest_block(&self) -> f64 {
        self.blocking_steps
            .iter()
            .map(|s| s.seconds)
            .fold(0.0, f64::max)
    }

    /// The text summary `finalize` ends with.
    pub fn render(&self) -> String {
        format!(
            "finalize: done in {:.1}s; longest write-blocking lock {:.3}s{}; schema is 65. \
             next: switch to the final package\n",
            self.seconds,
            self.longest_block(),
            replication::waited_text(self.replication_wait_seconds)
        )
    }
}

/// Helper constraint names and temporary index names (ours, never Hydra's).
fn check_name(table: Table) -> String {
    format!("hydra_upgrade_{}_jobset_id_not_null", table.name())
}
const TEMP_INDEXES: [(&str, &str, i32); 2] = [
    ("hydra_upgrade_tmp_64", "IndexFinishedSuccessfulBuilds", 64),
    (
        "hydra_upgrade_tmp_65",
        "IndexBuildsOnJobsetIdFinishedId",
        65,
    ),
];

fn version(db: &mut Db) -> Result<i32> {
    Ok(db
        .client()
        .query_one("SELECT version FROM SchemaVersion", &[])?
        .get(0))
}

fn nullable(db: &mut Db, table: Table) -> Result<bool> {
    Ok(db
        .client()
        .query_one(
            "SELECT NOT attnotnull FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'jobset_id'",
            &[&table.name()],
        )?
        .get(0))
}

fn constraint_state(db: &mut Db, table: Table) -> Result<Option<bool>> {
    let row = db.client().query_opt(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass($1) AND conname = $2",
        &[&table.name(), &check_name(table)],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// `Some(valid)` for an existing index.
fn index_state(db: &mut Db, name: &str) -> Result<Option<bool>> {
    let row = db.client().query_opt(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        &[&name.to_lowercase()],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// Run a short, write-blocking step under lock_timeout with retries; record its time.
///
/// An attempt that times out waiting for its lock counts as write-blocking too: while its
/// request waits in the lock queue, Hydra's writes to the table queue behind it.
fn short_step(
    db: &mut Db,
    opts: &Options,
    out: &Out,
    report: &mut Report,
    what: &str,
    mut step: impl FnMut(&mut postgres::Transaction<'_>) -> Result<()>,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        let start = Instant::now();
        let result = (|| {
            let mut tx = db.client().transaction()?;
            tx.batch_execute(&db::local_lock_timeout(opts.lock_timeout))?;
            step(&mut tx)?;
            tx.commit()?;
            Ok(())
        })();
        let done = LockStep {
            step: what.into(),
            seconds: start.elapsed().as_secs_f64(),
            at: report.since_start(start),
        };
        match result {
            Ok(()) => {
                report.blocking_steps.push(done);
                return Ok(());
            }
            Err(e) if !db::is_transient(&e) => return Err(e),
            Err(e) => {
                report.blocking_steps.push(LockStep {
                    step: format!("{what} (attempt {}, gave up its lock wait)", attempt + 1),
                    ..done
                });
                if attempt >= opts.max_retries {
                    return Err(e.context(Failure::new(
                        Exit::RetriesExhausted,
                        format!("{what}: could not get its short lock in {} tries; nothing is half-done, re-run `hydra-upgrade finalize` later", opts.max_retries + 1),
                    )));
                }
                let wait =
                    db::backoff(attempt, Duration::from_millis(200), Duration::from_secs(15));
                out.warn(&format!(
                    "{what}: {e:#}; Hydra holds a conflicting lock, retry {} in {} ms",
                    attempt + 1,
                    wait.as_millis()
                ));
                std::thread::sleep(wait);
                attempt += 1;
            }
        }
    }
}

/// Before a step that reads or writes a whole table (it cannot be paused once begun):
/// stop here if asked to (within `upgrade`, Ctrl-C), then wait while a standby or
/// subscriber is more than the limit behind.
fn standbys_first(
    db: &mut Db,
    lag: &mut LagWatch,
    table: Table,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<()> {
    const RESUME: &str = "Run the same command again: finalize goes on from the step it reached.";
    interrupt.check(RESUME)?;
    if let Some(behind) = lag.behind_now(db, table.name(), out)? {
        lag.wait(db, table.name(), behind, out, interrupt, RESUME)?;
    }
    Ok(())
}

fn online_step(db: &mut Db, report: &mut Report, what: &str, sql: &str) -> Result<()> {
    let start = Instant::now();
    db.client()
        .batch_execute(sql)
        .with_context(|| what.to_owned())?;
    report.online_steps.push(LockStep {
        step: what.into(),
        seconds: start.elapsed().as_secs_f64(),
        at: report.since_start(start),
    });
    Ok(())
}

/// Carry out upgrade-62..65 online. The caller has verified that no NULL row is left.
///
/// The session's timeouts are lifted for the long online steps and reset when it ends,
/// failed or not: `upgrade` goes on with the same connection. `interrupt` ends a wait
/// for a standby (exit 130).
pub fn run(db: &mut Db, opts: &Options, out: &Out, interrupt: &Interrupt) -> Result<Report> {
    let mut lag = LagWatch::new(opts.replication, Waiter::Finalize);
    let result = db.with_own_settings(|db| run_in_session(db, opts, out, interrupt, &mut lag));
    result.map(|report| Report {
        replication_wait_seconds: lag.waited.as_secs_f64(),
        ..report
    })
}

/// [`run`], free to change its session's settings.
fn run_in_session(
    db: &mut Db,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
    lag: &mut LagWatch,
) -> Result<Report> {
    let start = Instant::now();
    let mut report = Report {
        began: Some(start),
        ..Report::default()
    };
    db.take_upgrade_lock_waiting(interrupt, out)?;
    // A backfill killed outright may have left autoanalyze held off; the final catalog
    // must be Hydra's own.
    crate::backfill::autoanalyze::release(db, out, true)?;
    // Long online steps (VALIDATE, CREATE INDEX CONCURRENTLY) may take as long as they
    // need and may wait for old transactions: they do not block Hydra's writes.
    db.client()
        .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")?;
    // PostgreSQL 12 and later skip SET NOT NULL's scan when a valid check proves it.
    let scans = db.server_version()? < 120_000;
    if scans {
        out.warn(
            "this PostgreSQL is older than 12: its SET NOT NULL scans the whole table even \
             when a valid CHECK constraint proves there is no NULL, holding a lock that \
             blocks Hydra's reads and writes of Builds for that scan (about as long as \
             `SELECT count(*) FROM builds`). Upgrade PostgreSQL first, or run finalize at a \
             quiet time.",
        );
    }

    for (table, target) in [(Table::Jobs, 62), (Table::Builds, 63)] {
        if version(db)? >= target {
            continue;
        }
        let name = table.name();
        let check = check_name(table);
        if nullable(db, table)? {
            if constraint_state(db, table)?.is_none() {
                out.say(&format!(
                    "finalize: adding CHECK ({name}.jobset_id IS NOT NULL) NOT VALID"
                ));
                let sql = format!(
                    "ALTER TABLE {name} ADD CONSTRAINT {check} CHECK (jobset_id IS NOT NULL) NOT VALID"
                );
                short_step(
                    db,
                    opts,
                    out,
                    &mut report,
                    &format!("add NOT VALID check on {name}"),
                    |tx| Ok(tx.batch_execute(&sql)?),
                )?;
            }
            if constraint_state(db, table)? == Some(false) {
                // Its scan may log each page it sets hint bits on (data checksums or
                // wal_log_hints): every page the backfill rewrote.
                standbys_first(db, lag, table, out, interrupt)?;
                out.say(&format!(
                    "finalize: validating the check on {name} (writes go on)"
                ));
                let sql = format!("ALTER TABLE {name} VALIDATE CONSTRAINT {check}");
                if let Err(e) =
                    online_step(db, &mut report, &format!("validate check on {name}"), &sql)
                {
                    if db::sqlstate(&e) == Some(SqlState::CHECK_VIOLATION) {
                        db.client().batch_execute(&format!(
                            "ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {check}"
                        ))?;
                        return Err(fail(
                            Exit::RowsLeft,
                            format!(
                                "{name} has NULL jobset_id rows again (an older Hydra evaluator may still be running); \
                                 run `hydra-upgrade backfill` and `hydra-upgrade verify`, then finalize again"
                            ),
                        ));
                    }
                    return Err(e);
                }
            }
        }
        out.say(&format!(
            "finalize: SET NOT NULL on {name}.jobset_id ({}), schema -> {target}",
            if scans {
                "scanning the table under its lock: PostgreSQL < 12"
            } else {
                "no scan: the check proves it"
            }
        ));
        let set_not_null = step_sql(target).expect("62 and 63 are known steps");
        let drop_check = format!("ALTER TABLE {name} DROP CONSTRAINT IF EXISTS {check}");
        short_step(
            db,
            opts,
            out,
            &mut report,
            &format!("SET NOT NULL on {name} + SchemaVersion {target}"),
            |tx| {
                tx.batch_execute(set_not_null)?;
                tx.batch_execute(&drop_check)?;
                tx.execute(
                    "UPDATE SchemaVersion SET version = $1 WHERE version = $1 - 1",
                    &[&target],
                )?;
                Ok(())
            },
        )?;
    }

    if version(db)? < 65 {
        for (temp, real, n) in TEMP_INDEXES {
            if version(db)? >= n || index_state(db, real)? == Some(true) {
                continue;
            }
            if index_state(db, temp)? == Some(false) {
                out.say(&format!(
                    "finalize: dropping the invalid leftover index {temp} of an interrupted attempt"
                ));
                online_step(
                    db,
                    &mut report,
                    &format!("drop invalid {temp}"),
                    &format!("DROP INDEX CONCURRENTLY IF EXISTS {temp}"),
                )?;
            }
            if index_state(db, temp)?.is_none() {
                standbys_first(db, lag, Table::Builds, out, interrupt)?;
                out.say(&format!(
                    "finalize: building {real} concurrently (writes go on)"
                ));
                let sql = step_sql(n)
                    .expect("64 and 65 are known steps")
                    .replacen("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1)
                    .replacen(real, temp, 1);
                if let Err(e) = online_step(
                    db,
                    &mut report,
                    &format!("create index {real} concurrently"),
                    &sql,
                ) {
                    let _ = db
                        .client()
                        .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {temp}"));
                    return Err(e.context(format!("building {real} concurrently failed; the partial index was dropped, re-run finalize")));
                }
            }
        }
        out.say("finalize: renaming the new indexes to Hydra's names, schema -> 65");
        short_step(
            db,
            opts,
            out,
            &mut report,
            "rename indexes + SchemaVersion 65",
            |tx| {
                for (temp, real, _) in TEMP_INDEXES {
                    if db::relation_exists(tx, temp)? {
                        tx.batch_execute(&format!("ALTER INDEX {temp} RENAME TO {real}"))?;
                    }
                }
                tx.execute(
                    "UPDATE SchemaVersion SET version = 65 WHERE version < 65",
                    &[],
                )?;
                Ok(())
            },
        )?;
    }
    state::drop_all(db)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_says_the_wait_for_standbys_only_when_there_was_one() {
        let mut report = Report {
            blocking_steps: vec![LockStep {
                step: "rename".into(),
                seconds: 0.004,
                at: 1.0,
            }],
            seconds: 12.34,
            ..Report::default()
        };
        assert_eq!(
            report.render(),
            "finalize: done in 12.3s; longest write-blocking lock 0.004s; schema is 65. \
             next: switch to the final package\n"
        );
        report.replication_wait_seconds = 7.54;
        assert_eq!(
            report.render(),
            "finalize: done in 12.3s; longest write-blocking lock 0.004s; waited 7.5s for \
             standbys; schema is 65. next: switch to the final package\n"
        );
    }
}
