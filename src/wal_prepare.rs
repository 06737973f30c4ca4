//! `hydra-upgrade wal prepare` and `wal reset`: have PostgreSQL ready the WAL segments the
//! backfill will write into, and keep checkpoints out of its walk, for the backfill only.
//!
//! Why (src/backfill/wal_segments.rs, BENCHMARKS.md "WAL segments"): when no segment is
//! ready PostgreSQL creates the next one, zero-filled and synced, while it holds the WAL
//! write lock Hydra's commits need, and a quiet Hydra keeps few ready (`min_wal_size`);
//! and a checkpoint requested in the middle of the walk (at PostgreSQL's default
//! `max_wal_size`, after about 540 MB of WAL) holds Hydra's commits up with its writes. In
//! the benchmark at 1M builds, at PostgreSQL's defaults with a quiet Hydra's `pg_wal`, the
//! writer's p99 rose 10.03 x its idle one during the backfill, and 2.15-2.40 x after
//! this command (BENCHMARKS.md, "`wal prepare`"). The segments' creation holds Hydra's
//! commits as before, about one slow commit a segment, but when the admin runs it.
//!
//! `prepare` (superuser only, as `ALTER SYSTEM`, `pg_switch_wal()` and `CHECKPOINT` are):
//! - raises, with `ALTER SYSTEM` and a reload, `min_wal_size` to the WAL the rest of the
//!   walk writes (and a quarter more, for Hydra's own WAL meanwhile), `max_wal_size` so
//!   that no checkpoint is requested before that much WAL, and `checkpoint_timeout` to 30
//!   minutes; never lowers one;
//! - first writes what it changes, and what `postgresql.auto.conf` held before, into
//!   `postgresql.auto.conf` itself (the custom setting [`RECORD`]): `reset` puts back
//!   exactly that, even after a crash, and leaves a setting someone changed since alone;
//! - has PostgreSQL create the segments now, one at a time with a pause between (a
//!   little WAL, then `pg_switch_wal()`: each creation holds Hydra's commits as it would
//!   during the walk, but one creation at a time), then a `CHECKPOINT`, which recycles them
//!   as segments ready ahead.
//!
//! `reset` puts the settings back; later checkpoints remove the segments `min_wal_size`
//! no longer keeps. Until then `pg_wal` takes that much more disk space and a crash takes
//! longer to recover (up to the WAL since the last checkpoint).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backfill::state::TableProgress;
use crate::backfill::{Table, wal_segments};
use crate::db::Db;
use crate::exit::{Exit, fail};
use crate::interrupt::Interrupt;
use crate::progress::Out;
use crate::status::{Stage, Status};

/// The custom setting in `postgresql.auto.conf` that records what `prepare` changed.
pub const RECORD: &str = "hydra_upgrade.wal_prepared";

/// What `status` and `plan` say while `prepare`'s settings are in place.
pub const REMINDER: &str = "WAL settings raised by `hydra-upgrade wal prepare`: after the \
                            backfill, `wal reset` (as a superuser) puts them back";

/// The settings `prepare` may raise, with the unit `pg_settings` gives them in.
const SETTINGS: [(&str, &str); 3] = [
    ("min_wal_size", "MB"),
    ("max_wal_size", "MB"),
    ("checkpoint_timeout", "s"),
];

/// The unit `pg_settings` gives one of [`SETTINGS`] in.
fn unit(name: &str) -> Option<&'static str> {
    SETTINGS.iter().find(|(n, _)| *n == name).map(|(_, u)| *u)
}

/// Room kept beyond the WAL the walk writes, for Hydra's own WAL meanwhile.
const MARGIN: f64 = 1.25;

/// `checkpoint_timeout` for the backfill: a walk of tens of millions of builds takes more
/// than PostgreSQL's default 5 minutes. (Measured: only walks shorter than 5 minutes.)
const CHECKPOINT_TIMEOUT_SECS: i64 = 30 * 60;

#[derive(Debug, Clone)]
pub struct Options {
    /// Pause after each segment created, so Hydra's commits wait for one at a time.
    pub pause: Duration,
}

/// What `prepare` changed, kept in [`RECORD`]: each setting's `postgresql.auto.conf`
/// value before (`None`: it had none) and the value written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub before: BTreeMap<String, Option<String>>,
    pub set: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub setting: String,
    /// In effect before, in `pg_settings`' unit.
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PrepareReport {
    /// WAL the rest of the backfill writes, about.
    pub expected_bytes: i64,
    /// What `pg_wal` keeps for it: `expected_bytes` and a quarter more.
    pub keep_bytes: i64,
    pub ready_before_bytes: i64,
    pub ready_after_bytes: i64,
    pub segments_switched: i64,
    pub changes: Vec<Change>,
    /// Warnings the backfill would still print.
    pub warnings: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ResetReport {
    /// Settings put back as they were.
    pub restored: Vec<String>,
    /// Settings someone changed after `prepare`: left as they are.
    pub left: Vec<String>,
}

fn require_superuser(db: &mut Db, what: &str) -> Result<()> {
    let superuser: bool = db
        .client()
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )?
        .get(0);
    if superuser {
        return Ok(());
    }
    Err(fail(
        Exit::Privilege,
        format!(
            "`hydra-upgrade wal {what}` needs a PostgreSQL superuser (ALTER SYSTEM, \
             pg_switch_wal, CHECKPOINT), and {} is not one. On NixOS: `sudo -u postgres \
             hydra-upgrade wal {what} --db dbname=hydra`",
            db.describe()
        ),
    ))
}

/// The settings' values in effect, in `pg_settings`' units, and where they come from.
fn in_effect(db: &mut Db) -> Result<BTreeMap<String, (i64, String)>> {
    let names: Vec<&str> = SETTINGS.iter().map(|(n, _)| *n).collect();
    let mut values = BTreeMap::new();
    for row in db.client().query(
        "SELECT name, setting::bigint, unit, source FROM pg_settings WHERE name = ANY($1)",
        &[&names],
    )? {
        let name: String = row.get(0);
        let given: Option<String> = row.get(2);
        let expected = unit(&name);
        anyhow::ensure!(
            given.as_deref() == expected,
            "pg_settings gives {name} in {given:?}, not {expected:?}"
        );
        values.insert(name, (row.get(1), row.get(3)));
    }
    Ok(values)
}

/// `postgresql.auto.conf`'s entries (as written there) for the settings and the record.
fn auto_conf(db: &mut Db) -> Result<BTreeMap<String, String>> {
    let mut names: Vec<&str> = SETTINGS.iter().map(|(n, _)| *n).collect();
    names.push(RECORD);
    let rows = db.client().query(
        "SELECT DISTINCT ON (name) name, setting FROM pg_file_settings
          WHERE name = ANY($1) AND sourcefile ~ '(^|/)postgresql\\.auto\\.conf$'
          ORDER BY name, seqno DESC",
        &[&names],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn read_record(auto: &BTreeMap<String, String>) -> Result<Option<Record>> {
    match auto.get(RECORD).map(String::as_str) {
        None | Some("") => Ok(None),
        Some(text) => serde_json::from_str(text)
            .map(Some)
            .with_context(|| format!("reading {RECORD} in postgresql.auto.conf ({text})")),
    }
}

/// `ALTER SYSTEM SET name = value`, or `RESET` for `None`. One statement a call: ALTER
/// SYSTEM refuses to run in a transaction block.
pub fn alter_system(db: &mut Db, name: &str, value: Option<&str>) -> Result<()> {
    let sql = match value {
        Some(v) => format!("ALTER SYSTEM SET {name} = '{}'", v.replace('\'', "''")),
        None => format!("ALTER SYSTEM RESET {name}"),
    };
    db.client()
        .batch_execute(&sql)
        .with_context(|| format!("running {sql}"))
}

fn write_record(db: &mut Db, record: Option<&Record>) -> Result<()> {
    // Before PostgreSQL 11 ALTER SYSTEM knows a custom setting only once the session has
    // one of that name.
    db.client().batch_execute(&format!("SET {RECORD} = ''"))?;
    let text = record.map(serde_json::to_string).transpose()?;
    alter_system(db, RECORD, text.as_deref())
}

/// `pg_reload_conf()`: the server's processes read their configuration files again.
pub fn reload(db: &mut Db) -> Result<()> {
    db.client().batch_execute("SELECT pg_reload_conf()")?;
    Ok(())
}

/// A server setting as `pg_settings` gives it: text, in the setting's unit (MB, s, ...).
pub fn setting(db: &mut Db, name: &str) -> Result<String> {
    db.client()
        .query_opt("SELECT setting FROM pg_settings WHERE name = $1", &[&name])?
        .map(|row| row.get(0))
        .with_context(|| format!("the server has no setting {name:?}"))
}

/// After [`reload`]: wait, 10 s at most, until `done(name, setting)` holds for each of
/// `names` ([`setting`]'s text). A session reads its configuration again before its next
/// statement once the reload reached it, so `db` may be the session that reloaded.
pub fn wait_for_settings(
    db: &mut Db,
    names: &[&str],
    done: impl Fn(&str, &str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pending = Vec::new();
        for name in names {
            let now = setting(db, name)?;
            if !done(name, &now) {
                pending.push(format!("{name} (in effect {now})"));
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "10 s after pg_reload_conf() these settings are not as wanted: {}",
                pending.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// WAL since the last checkpoint's redo point: it counts towards the next checkpoint.
fn since_checkpoint(db: &mut Db) -> Result<i64> {
    Ok(db
        .client()
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - redo_lsn)::bigint FROM pg_control_checkpoint()",
            &[],
        )?
        .get(0))
}

/// What the rest of the backfill's walks write: all of Jobs and Builds before the
/// migration package added the columns, none once both are NOT NULL.
fn expected_wal(db: &mut Db, s: &Status) -> Result<i64> {
    let saved: &[TableProgress] = match s.stage {
        Stage::Final => return Ok(0),
        Stage::BeforeMigration => &[],
        Stage::Migration => {
            crate::backfill::require_columns(s)?;
            if !s.jobs_jobset_id.nullable && !s.builds_jobset_id.nullable {
                return Ok(0);
            }
            &s.backfill_progress
        }
    };
    let mut total = 0;
    for table in Table::ALL {
        let remaining = wal_segments::remaining(saved.iter().find(|p| p.table == table.name()));
        if remaining > 0.0 {
            total += wal_segments::outlook(db, table, remaining)?.expected;
        }
    }
    Ok(total)
}

fn mb_ceil(bytes: i64) -> i64 {
    (bytes + (1 << 20) - 1) >> 20
}

/// Prepare `pg_wal` for the rest of the backfill.
pub fn prepare(
    db: &mut Db,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<PrepareReport> {
    let started = Instant::now();
    require_superuser(db, "prepare")?;
    let status = crate::status::detect_stage(db)?;
    let expected = expected_wal(db, &status)?;
    let ready = wal_segments::ready(db)?
        .context("a superuser may look into pg_wal, yet pg_ls_waldir() was refused")?;
    let mut report = PrepareReport {
        expected_bytes: expected,
        ready_before_bytes: ready.bytes(),
        ..PrepareReport::default()
    };
    if expected == 0 {
        out.say("nothing to prepare: nothing is left to backfill");
        return Ok(report);
    }
    let segment = ready.segment_bytes;
    let keep = ((expected as f64 * MARGIN) as i64 + segment - 1) / segment * segment;
    report.keep_bytes = keep;

    // Requested once the WAL since the last checkpoint passes max_wal_size / divisor.
    let divisor = wal_segments::checkpoint_divisor(db)?;
    let targets = [
        ("min_wal_size", mb_ceil(keep)),
        (
            "max_wal_size",
            mb_ceil(((keep + since_checkpoint(db)?) as f64 * divisor) as i64),
        ),
        ("checkpoint_timeout", CHECKPOINT_TIMEOUT_SECS),
    ];

    let now = in_effect(db)?;
    let auto = auto_conf(db)?;
    let mut record = read_record(&auto)?.unwrap_or_default();
    let mut wanted = BTreeMap::new();
    for (name, target) in targets {
        let (current, source) = now
            .get(name)
            .cloned()
            .with_context(|| format!("{name} is missing from pg_settings"))?;
        if current >= target {
            continue;
        }
        if source != "configuration file" && source != "default" {
            out.warn(&format!(
                "{name} is set by the server's {source} ({current}), which ALTER SYSTEM does \
                 not override: raise it there to at least {target}"
            ));
            continue;
        }
        let unit = unit(name).unwrap_or_default();
        let value = format!("{target}{unit}");
        record
            .before
            .entry(name.to_owned())
            .or_insert_with(|| auto.get(name).cloned());
        report.changes.push(Change {
            setting: name.to_owned(),
            from: format!("{current}{unit}"),
            to: value.clone(),
        });
        record.set.insert(name.to_owned(), value);
        wanted.insert(name.to_owned(), target);
    }
    if !wanted.is_empty() {
        // The record first: whatever happens next, `reset` knows what to put back.
        write_record(db, Some(&record))?;
        for name in wanted.keys() {
            alter_system(db, name, record.set.get(name).map(String::as_str))?;
        }
        reload(db)?;
        let names: Vec<&str> = wanted.keys().map(String::as_str).collect();
        wait_for_settings(db, &names, |name, now| {
            now.parse::<i64>().ok() == wanted.get(name).copied()
        })
        .with_context(|| {
            format!(
                "the raised settings did not take effect (wanted, in pg_settings' units: \
                 {wanted:?}). See the server's log; `hydra-upgrade wal reset` undoes what was \
                 written"
            )
        })?;
        let changes: Vec<String> = report
            .changes
            .iter()
            .map(|c| format!("{} {} -> {}", c.setting, c.from, c.to))
            .collect();
        out.event(
            "wal_settings",
            &format!(
                "raised for the backfill (ALTER SYSTEM): {}; `hydra-upgrade wal reset` puts \
                 them back",
                changes.join(", ")
            ),
            serde_json::json!({ "changes": report.changes }),
        );
    }

    // Each switch moves the WAL into the next segment, created if none is ready; the
    // checkpoint then recycles every used one, as far as min_wal_size keeps them.
    let switches = keep / segment;
    out.event(
        "wal_prepare",
        &format!(
            "making {} MB of WAL segments ready ({switches} switches of {} MB, {} ms apart; \
             {} MB ready now, the backfill writes about {} MB)",
            keep >> 20,
            segment >> 20,
            opts.pause.as_millis(),
            ready.bytes() >> 20,
            expected >> 20
        ),
        serde_json::json!({ "switches": switches, "segment_bytes": segment }),
    );
    for _ in 0..switches {
        interrupt.check(
            "The raised settings stay until `hydra-upgrade wal reset`; `wal prepare` again \
             goes on",
        )?;
        db.client().batch_execute(
            "SELECT pg_logical_emit_message(false, 'hydra-upgrade', 'wal prepare');
             SELECT pg_switch_wal()",
        )?;
        report.segments_switched += 1;
        std::thread::sleep(opts.pause);
    }
    // Before PostgreSQL 11 a checkpoint keeps the WAL back to the previous checkpoint's
    // redo point and counts min_wal_size from there: only a second one recycles ours.
    let checkpoints = if db.server_version()? < 110_000 { 2 } else { 1 };
    for _ in 0..checkpoints {
        db.client()
            .batch_execute("CHECKPOINT")
            .context("CHECKPOINT, to recycle the segments")?;
    }

    let after = wal_segments::ready(db)?.context("pg_ls_waldir() refused")?;
    report.ready_after_bytes = after.bytes();
    let builds = crate::upgrade::wal_outlook(db, &status)?;
    report.warnings = builds.map(|o| o.warnings()).unwrap_or_default();
    for w in &report.warnings {
        out.warn(w);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Put back what `prepare` changed, where nobody changed it since.
pub fn reset(db: &mut Db, out: &Out) -> Result<ResetReport> {
    require_superuser(db, "reset")?;
    let auto = auto_conf(db)?;
    let mut report = ResetReport::default();
    let Some(record) = read_record(&auto)? else {
        out.say("nothing to reset: `hydra-upgrade wal prepare` changed no setting here");
        return Ok(report);
    };
    for (name, ours) in &record.set {
        let before = record.before.get(name).cloned().flatten();
        if auto.get(name) == before.as_ref() {
            // As it was: `prepare` stopped between writing its record and this setting.
            continue;
        }
        if auto.get(name) != Some(ours) {
            out.warn(&format!(
                "{name} was changed after `wal prepare` set it to {ours} (postgresql.auto.conf \
                 now: {}); left as it is",
                auto.get(name).map(String::as_str).unwrap_or("nothing")
            ));
            report.left.push(name.clone());
            continue;
        }
        alter_system(db, name, before.as_deref())?;
        report.restored.push(name.clone());
    }
    write_record(db, None)?;
    reload(db)?;
    out.say(&format!(
        "put back: {}{}",
        if report.restored.is_empty() {
            "nothing".to_owned()
        } else {
            report.restored.join(", ")
        },
        if report.left.is_empty() {
            String::new()
        } else {
            format!("; left as changed since: {}", report.left.join(", "))
        }
    ));
    Ok(report)
}

/// Whether `prepare`'s settings are in place, as any role sees it (the record is a
/// setting every session reads): for `status` and `finalize` to remind the admin.
pub fn prepared(db: &mut Db) -> Result<bool> {
    let value: Option<String> = db
        .client()
        .query_one(&format!("SELECT current_setting('{RECORD}', true)"), &[])?
        .get(0);
    Ok(value.is_some_and(|v| !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_back_what_it_wrote() {
        let mut record = Record::default();
        record.before.insert("min_wal_size".into(), None);
        record
            .before
            .insert("checkpoint_timeout".into(), Some("7min".into()));
        record.set.insert("min_wal_size".into(), "1040MB".into());
        record
            .set
            .insert("checkpoint_timeout".into(), "1800s".into());
        let mut auto = BTreeMap::new();
        auto.insert(RECORD.to_owned(), serde_json::to_string(&record).unwrap());
        assert_eq!(read_record(&auto).unwrap(), Some(record));
        auto.insert(RECORD.to_owned(), String::new());
        assert_eq!(read_record(&auto).unwrap(), None);
        auto.remove(RECORD);
        assert_eq!(read_record(&auto).unwrap(), None);
    }

    #[test]
    fn sizes_round_up_to_whole_megabytes() {
        assert_eq!(mb_ceil(0), 0);
        assert_eq!(mb_ceil(1), 1);
        assert_eq!(mb_ceil(16 << 20), 16);
        assert_eq!(mb_ceil((16 << 20) + 1), 17);
    }
}
