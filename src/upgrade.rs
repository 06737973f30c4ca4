//! The whole upgrade, in order, from wherever the database stands: switch to the
//! migration package, backfill, verify, finalize online, switch to the final package.
//! The database decides where to start, so a re-run after any interruption continues.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::backfill;
use crate::db::Db;
use crate::exit::{Exit, fail};
use crate::finalize;
use crate::host::{Host, Phase, SwitchReport};
use crate::hydra_schema::MIGRATION_VERSION;
use crate::interrupt::Interrupt;
use crate::progress::Out;
use crate::status::{self, Stage, Status};
use crate::verify::{self, Verification};

#[derive(Debug, Clone)]
pub struct Options {
    pub backfill: backfill::Options,
    pub finalize: finalize::Options,
    /// Let the final package's hydra-init apply 62..65 (long locks) instead of finalize.
    pub stock_final: bool,
    /// Backfill/verify rounds before giving up on NULL rows that keep coming back.
    pub max_rounds: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedStep {
    pub step: &'static str,
    pub description: String,
}

/// What `upgrade` would do next, from this status and the switch an earlier run left
/// under way (`pending`, from the host's state file). Changes nothing.
pub fn plan(s: &Status, stock_final: bool, host: &str, pending: Option<Phase>) -> Vec<PlannedStep> {
    let mut steps = Vec::new();
    let mut add = |step, description: String| steps.push(PlannedStep { step, description });
    match pending {
        // `run` forgets a pending final switch before the migration schema.
        Some(Phase::Final) if s.stage == Stage::Migration => {
            add(
                "switch-final",
                format!(
                    "finish the switch to the hydra-unstable system that an earlier run began on \
                     {host} (verify first; its hydra-init applies upgrade-{}..65, whatever \
                     --stock-final says now), then check hydra-init and Hydra's health",
                    s.schema_version + 1
                ),
            );
            return steps;
        }
        Some(Phase::Migration) if s.stage == Stage::Migration => add(
            "switch-migration",
            format!(
                "finish the switch to the hydra-migration system that an earlier run began on \
                 {host}: check hydra-init and Hydra's health"
            ),
        ),
        _ => {}
    }
    if s.stage == Stage::Final {
        add(
            "switch-final",
            format!(
                "make sure {host} runs the final package (hydra-unstable); the schema is already at {}",
                s.schema_version
            ),
        );
        return steps;
    }
    if s.stage == Stage::BeforeMigration {
        add(
            "switch-migration",
            format!(
                "activate the hydra-migration system on {host}; its hydra-init applies upgrade-{}..61 (adds Jobsets.id and the nullable jobset_id columns, seconds)",
                s.schema_version + 1
            ),
        );
    }
    if !columns_not_null(s) {
        let rows = match (s.stage, s.null_rows_text()) {
            (Stage::Migration, Some(n)) => format!("{n} NULL rows now"),
            (Stage::Migration, None) => "NULL rows not counted".into(),
            _ => "every existing row".into(),
        };
        add(
            "backfill",
            format!(
                "fill Jobs.jobset_id and Builds.jobset_id online ({rows}); Hydra keeps serving"
            ),
        );
        add(
            "verify",
            "count NULL, orphan and wrong jobset_id rows; stop here unless all are zero".into(),
        );
    }
    if stock_final {
        add(
            "switch-final",
            format!(
                "activate the hydra-unstable system on {host}; its hydra-init applies upgrade-62..65 under long write-blocking locks"
            ),
        );
    } else {
        add("finalize", "apply the effect of upgrade-62..65 online: NOT NULL via a validated CHECK, both indexes CONCURRENTLY, SchemaVersion 65; only sub-second write-blocking locks from PostgreSQL 12 on".into());
        add(
            "switch-final",
            format!(
                "activate the hydra-unstable system on {host}; its hydra-init finds nothing left to do"
            ),
        );
    }
    steps
}

/// Both columns NOT NULL already at the migration stage (a finalize that stopped after
/// its `SET NOT NULL`): `run` skips the backfill and the verify and goes on with the
/// finalize, and the plan says the same.
fn columns_not_null(s: &Status) -> bool {
    s.stage == Stage::Migration && !s.jobs_jobset_id.nullable && !s.builds_jobset_id.nullable
}

/// Whether the plan still has a backfill (before schema 65, with a column still nullable).
fn backfill_to_come(s: &Status) -> bool {
    s.stage != Stage::Final && !columns_not_null(s)
}

/// What defeats HOT updates of Builds right now, when the plan still has a backfill: with
/// any of it `--strategy auto` walks Builds by keyset (`backfill::hot_blockers`, at the
/// default `--horizon-age-secs`).
pub fn hot_outlook(db: &mut Db, s: &Status) -> Result<Vec<String>> {
    if !backfill_to_come(s) {
        return Ok(Vec::new());
    }
    let age = Duration::from_secs(crate::cli::BackfillArgs::defaults().horizon_age_secs);
    backfill::hot_blockers(db, backfill::Table::Builds, age)
}

/// What the backfill's walk of Builds will ask of `pg_wal`, when the plan still has one
/// (`backfill::wal_segments`).
pub fn wal_outlook(db: &mut Db, s: &Status) -> Result<Option<backfill::wal_segments::Outlook>> {
    if !backfill_to_come(s) {
        return Ok(None);
    }
    let remaining =
        backfill::wal_segments::remaining(s.backfill_progress.iter().find(|p| p.table == "builds"));
    if remaining <= 0.0 {
        return Ok(None);
    }
    backfill::wal_segments::outlook(db, backfill::Table::Builds, remaining).map(Some)
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub steps: Vec<(String, f64)>,
    pub switches: Vec<SwitchReport>,
    pub backfills: Vec<backfill::Report>,
    pub verification: Option<Verification>,
    pub finalize: Option<finalize::Report>,
    /// The longest time one step of the final phase held a lock blocking Hydra's writes.
    pub longest_final_block_seconds: f64,
    pub final_status: Option<Status>,
}

fn timed<T>(
    report: &mut Report,
    out: &Out,
    step: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    out.event("step_start", &format!("==> {step}"), json!({"step": step}));
    let start = Instant::now();
    let value = f()?;
    let secs = start.elapsed().as_secs_f64();
    out.event(
        "step_done",
        &format!("<== {step}: done in {secs:.1}s"),
        json!({"step": step, "seconds": secs}),
    );
    report.steps.push((step.to_owned(), secs));
    Ok(value)
}

/// Record the duration of the step `timed` just finished in the host's state.
fn note(host: &mut dyn Host, report: &Report) -> Result<()> {
    match report.steps.last() {
        Some((step, secs)) => host.record_step(step, Some(*secs)),
        None => Ok(()),
    }
}

/// One backfill pass: in a detached unit when the host offers one (the upgrade lock is
/// handed over to it meanwhile), else in this process.
fn backfill_once(
    db: &mut Db,
    host: &mut dyn Host,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<Option<backfill::Report>> {
    db.client()
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .context("handing the upgrade lock to the backfill")?;
    let detached = host.detached_backfill(out)?;
    db.take_upgrade_lock_waiting(interrupt, out)?;
    match detached {
        Some(d) => Ok(d.report),
        None => backfill::run(db, &opts.backfill, out, interrupt).map(Some),
    }
}

/// Backfill and verify until clean; orphans or wrong values stop at once, NULL rows that
/// keep coming back stop after `max_rounds`.
fn backfill_until_clean(
    db: &mut Db,
    host: &mut dyn Host,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
    report: &mut Report,
) -> Result<()> {
    for round in 1..=opts.max_rounds {
        host.record_step("backfill", None)?;
        let b = timed(report, out, "backfill", || {
            backfill_once(db, host, opts, out, interrupt)
        })?;
        note(host, report)?;
        report.backfills.extend(b);
        host.record_step("verify", None)?;
        let v = timed(report, out, "verify", || verify::run(db))?;
        note(host, report)?;
        let clean = v.clean;
        let stuck = v.tables.iter().any(|t| t.orphans > 0 || t.wrong > 0);
        if !clean {
            out.say(&v.render());
        }
        let summary = v.summary();
        report.verification = Some(v);
        if clean {
            return Ok(());
        }
        if stuck || round == opts.max_rounds {
            let why = if stuck {
                "orphan or wrong rows need an admin's decision".to_owned()
            } else {
                format!(
                    "NULL rows came back {round} times: an older Hydra evaluator is probably still writing rows without jobset_id; stop it"
                )
            };
            return Err(fail(
                Exit::RowsLeft,
                format!(
                    "the final phase is refused: {summary}. {why}. `hydra-upgrade verify` lists them; re-run `hydra-upgrade upgrade` afterwards."
                ),
            ));
        }
        out.warn(&format!(
            "verify found NULL rows again ({summary}); backfilling once more"
        ));
    }
    Ok(())
}

/// After a switch, the schema must be where that package's hydra-init leaves it.
fn confirm_schema(db: &mut Db, phase: Phase) -> Result<()> {
    let s = status::detect_stage(db)?;
    match phase {
        Phase::Migration => {
            if s.schema_version < MIGRATION_VERSION
                || !s.jobs_jobset_id.exists
                || !s.builds_jobset_id.exists
            {
                anyhow::bail!(
                    "after the switch the schema is at {}, not {MIGRATION_VERSION} with both \
                     jobset_id columns: the new system's hydra-init did not apply \
                     upgrade-59..61. Does the migration system really run pkgs.hydra-migration?",
                    s.schema_version
                );
            }
            Ok(())
        }
        Phase::Final => {
            let indexes = s.final_indexes.iter().all(|(_, ok)| *ok);
            if s.stage != Stage::Final
                || s.jobs_jobset_id.nullable
                || s.builds_jobset_id.nullable
                || !indexes
            {
                anyhow::bail!(
                    "after the switch the schema is at {} (Jobs.jobset_id {}, Builds.jobset_id \
                     {}, final indexes {}): the final system's hydra-init did not complete \
                     upgrade-62..65. Does the final system really run pkgs.hydra-unstable?",
                    s.schema_version,
                    if s.jobs_jobset_id.nullable {
                        "nullable"
                    } else {
                        "NOT NULL"
                    },
                    if s.builds_jobset_id.nullable {
                        "nullable"
                    } else {
                        "NOT NULL"
                    },
                    if indexes { "present" } else { "missing" },
                );
            }
            Ok(())
        }
    }
}

/// How long to wait for PostgreSQL to take connections again after a switch restarted it.
const RECONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(120);

/// [`confirm_schema`] after a switch. An activation that restarts PostgreSQL (a new
/// system with another PostgreSQL build, a changed `services.postgresql` setting) closes
/// our session, and with it the upgrade lock: open it again once the server takes
/// connections, take the lock again, then confirm. (Taken for a failed switch, the closed
/// session rolled back a switch that had worked.) The outer error: the database could not
/// be reached again (or another hydra-upgrade took the lock meanwhile), which says nothing
/// about the switch; the inner one: the confirmation failed.
fn confirm_after_switch(
    db: &mut Db,
    phase: Phase,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<Result<()>> {
    match confirm_schema(db, phase) {
        Err(e) if crate::exit::lost_connection(&e) => {
            out.warn(&format!(
                "the switch closed our database session ({e:#}; PostgreSQL restarted?): \
                 connecting again"
            ));
            db.reconnect(RECONNECT_WITHIN, interrupt)?;
            db.take_upgrade_lock_waiting(interrupt, out)?;
            Ok(confirm_schema(db, phase))
        }
        other => Ok(other),
    }
}

/// Switch the host to `phase`: remember what runs now, (for the final phase) verify at
/// this very moment, activate, wait for hydra-init, confirm the schema and Hydra's
/// health; roll back when any of that fails.
fn switch_phase(
    db: &mut Db,
    host: &mut dyn Host,
    phase: Phase,
    out: &Out,
    interrupt: &Interrupt,
    report: &mut Report,
) -> Result<()> {
    let step = match phase {
        Phase::Migration => "switch-migration",
        Phase::Final => "switch-final",
    };
    host.record_step(step, None)?;
    let resumed = host.pending_switch() == Some(phase);
    if !resumed {
        // Remembers the running system to roll back to; the switch counts as under way
        // (one for a re-run to finish) only once `switch` begins it, so a run stopped
        // during the verify below (minutes at tens of millions of builds) leaves none, and
        // the re-run decides afresh (with its own --stock-final).
        host.prepare_switch(phase, out)?;
    }
    if phase == Phase::Final {
        if resumed {
            // A stock final activation still running holds Builds under its hydra-init's
            // locks: the verify would wait on them without a word.
            host.await_running_switch(phase, out)?;
        }
        let verified = timed(report, out, "verify before the final switch", || {
            verify::run(db)
        });
        let v = match verified {
            Ok(v) => v,
            Err(e) => {
                if !resumed {
                    let _ = host.abort_switch();
                }
                return Err(e);
            }
        };
        if !v.clean {
            out.say(&v.render());
            let refused = format!(
                "the final switch is refused: verify is not clean right before it: {}. Stop \
                 whatever writes these rows (an older Hydra evaluator), then run \
                 `hydra-upgrade upgrade` again.",
                v.summary()
            );
            if resumed && host.pending_switch_began()? {
                // An earlier run's activation went ahead: back to where it began.
                return Err(host.roll_back(phase, out, anyhow::anyhow!(refused)));
            }
            host.abort_switch()?;
            return Err(fail(
                Exit::RowsLeft,
                format!("{refused} The host stays on the system it runs."),
            ));
        }
    }
    let label = match phase {
        Phase::Migration => "switch to the migration package",
        Phase::Final => "switch to the final package",
    };
    let sw = timed(report, out, label, || host.switch(phase, out))?;
    note(host, report)?;
    let block = sw
        .schema_steps
        .iter()
        .map(|s| s.duration.as_secs_f64())
        .fold(0.0, f64::max);
    if phase == Phase::Final {
        report.longest_final_block_seconds = report.longest_final_block_seconds.max(block);
    }
    report.switches.push(sw);
    // Not reaching the database again is no verdict on the switch: it stays pending, and
    // the re-run confirms it (or rolls it back) as after an interrupt.
    let confirmed = confirm_after_switch(db, phase, out, interrupt).map_err(|e| {
        e.context(
            "the switch is left to be confirmed: the re-run checks hydra-init, the schema \
             and Hydra's health, and rolls back only if one of them fails",
        )
    })?;
    let checked =
        confirmed.and_then(|()| timed(report, out, "health check", || host.check_health(out)));
    if let Err(e) = checked {
        if crate::exit::exit_of(&e) == Exit::Interrupted {
            return Err(e);
        }
        return Err(host.roll_back(phase, out, e));
    }
    host.switch_confirmed(phase)
}

pub fn run(
    db: &mut Db,
    host: &mut dyn Host,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<Report> {
    let mut report = Report::default();
    host.follow_running_backfill(out)?;
    db.take_upgrade_lock_waiting(interrupt, out)?;
    if host.pending_switch() == Some(Phase::Final)
        && status::detect_stage(db)?.stage == Stage::BeforeMigration
    {
        // Cannot be ours (the final switch comes after the migration schema): forget it.
        host.abort_switch()?;
    }
    if let Some(phase) = host.pending_switch() {
        out.say(&format!(
            "an earlier run was stopped while switching to the {} system; finishing that switch first",
            phase.package()
        ));
        switch_phase(db, host, phase, out, interrupt, &mut report)?;
    }
    for _ in 0..8 {
        interrupt.check("Run `hydra-upgrade upgrade` again to continue.")?;
        let s = status::detect_stage(db)?;
        match s.stage {
            Stage::BeforeMigration => {
                switch_phase(db, host, Phase::Migration, out, interrupt, &mut report)?;
            }
            Stage::Migration if host.rolled_back_from_migration()? => {
                out.warn(&format!(
                    "the database is at schema {}, yet the host runs neither the migration nor \
                     the final system: the last switch to the migration system was rolled back \
                     after its hydra-init ran. Switching to the migration system again first, \
                     so that no older Hydra writes rows without jobset_id while the backfill runs",
                    s.schema_version
                ));
                switch_phase(db, host, Phase::Migration, out, interrupt, &mut report)?;
            }
            Stage::Migration => {
                if !columns_not_null(&s) {
                    backfill_until_clean(db, host, opts, out, interrupt, &mut report)?;
                }
                if opts.stock_final {
                    switch_phase(db, host, Phase::Final, out, interrupt, &mut report)?;
                } else {
                    host.record_step("finalize", None)?;
                    let f = timed(&mut report, out, "finalize online", || {
                        finalize::run(db, &opts.finalize, out, interrupt)
                    })?;
                    note(host, &report)?;
                    report.longest_final_block_seconds = f.longest_block();
                    report.finalize = Some(f);
                }
            }
            Stage::Final => {
                if host.moved_on_from_final()? {
                    out.say(
                        "the final switch was made by an earlier run, and the host has moved on \
                         to a system of its own since: nothing to switch",
                    );
                } else if !host.is_on(Phase::Final)? {
                    switch_phase(db, host, Phase::Final, out, interrupt, &mut report)?;
                }
                // `--stock-final`, or a finalize by hand: no step of ours ran after a
                // backfill killed outright.
                crate::backfill::autoanalyze::release_left_over(db, out)?;
                host.record_step("done", None)?;
                report.final_status = Some(status::detect(db, false)?);
                return Ok(report);
            }
        }
    }
    Err(fail(
        Exit::Internal,
        "the upgrade did not converge after 8 steps; `hydra-upgrade status` shows where it stands",
    ))
}
