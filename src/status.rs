//! Where the upgrade stands, read from the database alone: schema version, the catalog
//! state of the jobset_id columns and final indexes, NULL rows left, and the next step.
//! Refuses databases that are not Hydra, and catalogs that contradict `SchemaVersion`.

use std::time::Duration;

use anyhow::{Context, Result};
use postgres::GenericClient;
use serde::Serialize;

use crate::backfill::state;
use crate::db::{Db, relation_exists};
use crate::exit::{Exit, fail};
use crate::hydra_schema::{FINAL_VERSION, MIGRATION_VERSION};

/// The two indexes upgrade-64 and upgrade-65 create, by their (lower-cased) names.
pub const FINAL_INDEXES: [&str; 2] = [
    "indexfinishedsuccessfulbuilds",
    "indexbuildsonjobsetidfinishedid",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Schema below 61: the migration package has not run (or not finished) hydra-init.
    BeforeMigration,
    /// Schema 61..64: jobset_id columns exist; backfill, verify and finalize go here.
    Migration,
    /// Schema 65 or later: nothing to do.
    Final,
}

#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub exists: bool,
    pub nullable: bool,
    /// NULL rows left; `None` when the column does not exist, when its table was locked
    /// and `status` did not wait (see `Status::counts_blocked_by`), or when they were not
    /// counted ([`detect_stage`]).
    pub null_rows: Option<i64>,
    /// Whether `null_rows` is an exact count or an estimate.
    pub exact: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub database: String,
    pub schema_version: i32,
    pub stage: Stage,
    pub jobsets_id: bool,
    pub jobs_jobset_id: Column,
    pub builds_jobset_id: Column,
    pub final_indexes: Vec<(String, bool)>,
    pub backfill_progress: Vec<state::TableProgress>,
    /// Rows per table a backfill found locked by another transaction and has not
    /// filled yet (its last run ran out of retries waiting for them); tables with none
    /// are left out.
    pub held_rows: Vec<(crate::backfill::Table, i64)>,
    /// The hydra-upgrade session working on this database right now, if any.
    pub running: Option<String>,
    /// Tables whose autoanalyze hydra-upgrade holds off (a backfill running, or one
    /// killed outright; the next backfill or finalize resets it).
    pub autoanalyze_held_off: Vec<crate::backfill::Table>,
    /// `hydra-upgrade wal prepare`'s raised settings are in place (a superuser's `wal
    /// reset` puts them back).
    pub wal_prepared: bool,
    /// Sessions whose lock on Jobs or Builds kept `status` from counting NULL rows (an
    /// ACCESS EXCLUSIVE lock: `hydra-init`'s own `SET NOT NULL` scan holds one throughout).
    pub counts_blocked_by: Vec<String>,
    /// False from [`detect_stage`], which counts no NULL rows.
    pub null_rows_counted: bool,
    pub next_step: String,
}

impl Status {
    /// The nullable columns, whose NULL rows count.
    fn nullable_columns(&self) -> impl Iterator<Item = &Column> {
        [&self.jobs_jobset_id, &self.builds_jobset_id]
            .into_iter()
            .filter(|c| c.exists && c.nullable)
    }

    /// NULL rows left in Jobs and Builds; `None` when a nullable column's were not
    /// counted (a lock on the table, or [`detect_stage`]).
    pub fn null_rows(&self) -> Option<i64> {
        self.nullable_columns().map(|c| c.null_rows).sum()
    }

    /// [`Self::null_rows`] in words: "about N" when a count is a sample's estimate.
    pub fn null_rows_text(&self) -> Option<String> {
        let n = self.null_rows()?;
        Some(if self.nullable_columns().all(|c| c.exact) {
            n.to_string()
        } else {
            format!("about {n}")
        })
    }
}

/// Exact counts for tables below this size (about 350,000 Builds rows); above it, a
/// 1 % page sample.
const EXACT_BELOW_BYTES: i64 = 64 << 20;

/// How long the `status` command waits for a lock on Jobs or Builds to count NULL rows.
pub const STATUS_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Read the catalog: is this Hydra, what version, do the pieces agree?
pub fn detect(db: &mut Db, exact: bool) -> Result<Status> {
    detect_inner(db, Some(exact), None)
}

/// As [`detect`], without counting NULL rows (each nullable column's `null_rows` is
/// `None`): for the commands that only need the stage and which columns are nullable
/// (backfill, verify, finalize, upgrade's steps). Once a backfill is about done the count
/// is a full scan of Builds (minutes at tens of millions of rows), which those commands
/// would make only to throw away.
pub fn detect_stage(db: &mut Db) -> Result<Status> {
    detect_inner(db, None, None)
}

/// As [`detect`]; with `lock_wait`, a NULL count that would wait longer than that for a
/// lock on its table is left unknown, and the sessions holding it are named, instead of
/// waiting for them (for the `status` command: an admin asking what is going on while
/// `hydra-init` scans Builds under an ACCESS EXCLUSIVE lock).
pub fn detect_with(db: &mut Db, exact: bool, lock_wait: Option<Duration>) -> Result<Status> {
    detect_inner(db, Some(exact), lock_wait)
}

/// [`detect_with`]; `exact` None counts no NULL rows ([`detect_stage`]).
fn detect_inner(db: &mut Db, exact: Option<bool>, lock_wait: Option<Duration>) -> Result<Status> {
    let client = db.client();
    if !relation_exists(client, "schemaversion")?
        || !relation_exists(client, "jobsets")?
        || !relation_exists(client, "builds")?
    {
        return Err(fail(
            Exit::NotHydra,
            "this database is not a Hydra database (no SchemaVersion, Jobsets or Builds table). \
             Check --db / HYDRA_DBI: it must name the database Hydra itself uses.",
        ));
    }
    let versions: Vec<i32> = client
        .query("SELECT version FROM SchemaVersion", &[])
        .context("reading SchemaVersion")?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let [version] = versions[..] else {
        return Err(fail(
            Exit::SchemaMismatch,
            format!(
                "SchemaVersion holds {} rows instead of one; hydra-init would not know the \
                 schema either. Repair it by hand before upgrading.",
                versions.len()
            ),
        ));
    };
    let jobs_exists = relation_exists(client, "jobs")?;
    let jobsets_id = column(client, "jobsets", "id")?.is_some();
    let jobs_col = if jobs_exists {
        column(client, "jobs", "jobset_id")?
    } else {
        None
    };
    let builds_col = column(client, "builds", "jobset_id")?;
    let mut final_indexes = Vec::new();
    for name in FINAL_INDEXES {
        let valid: bool = client
            .query_one(
                "SELECT coalesce((SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)), false)",
                &[&name],
            )?
            .get(0);
        final_indexes.push((name.to_owned(), valid));
    }

    let contradiction = |what: &str| {
        fail(
            Exit::SchemaMismatch,
            format!(
                "the catalog contradicts SchemaVersion {version}: {what}. Something changed the \
                 schema outside hydra-init; compare it with Hydra's upgrade-N.sql files and \
                 repair it by hand, then run `hydra-upgrade status` again."
            ),
        )
    };
    if version <= FINAL_VERSION {
        let expect = |present: bool, since: i32, what: &str| -> Result<()> {
            match (present, version >= since) {
                (false, true) => Err(contradiction(&format!(
                    "{what} is missing (added by upgrade-{since})"
                ))),
                (true, false) => Err(contradiction(&format!(
                    "{what} exists (only upgrade-{since} adds it)"
                ))),
                _ => Ok(()),
            }
        };
        expect(jobsets_id, 59, "Jobsets.id")?;
        expect(jobs_col.is_some(), 60, "Jobs.jobset_id")?;
        expect(builds_col.is_some(), 61, "Builds.jobset_id")?;
        // From 61 on, `finalize` may run ahead of SchemaVersion (NOT NULL set, indexes
        // built online), so only what lags behind the version is a contradiction.
        if version >= 62 && jobs_col == Some(true) {
            return Err(contradiction(
                "Jobs.jobset_id is still nullable (upgrade-62 sets NOT NULL)",
            ));
        }
        if version >= 63 && builds_col == Some(true) {
            return Err(contradiction(
                "Builds.jobset_id is still nullable (upgrade-63 sets NOT NULL)",
            ));
        }
        for (i, (name, ok)) in final_indexes.iter().enumerate() {
            if version >= 64 + i as i32 && !ok {
                return Err(contradiction(&format!(
                    "index {name} is missing or invalid"
                )));
            }
        }
    }

    let stage = if version < MIGRATION_VERSION {
        Stage::BeforeMigration
    } else if version < FINAL_VERSION {
        Stage::Migration
    } else {
        Stage::Final
    };
    let mut counts_blocked_by = Vec::new();
    let mut count = |c: &mut postgres::Client, table: &str, col: Option<bool>| -> Result<Column> {
        Ok(match col {
            None => Column {
                exists: false,
                nullable: false,
                null_rows: None,
                exact: true,
            },
            Some(false) => Column {
                exists: true,
                nullable: false,
                null_rows: Some(0),
                exact: true,
            },
            Some(true) if exact.is_none() => Column {
                exists: true,
                nullable: true,
                null_rows: None,
                exact: false,
            },
            Some(true) => {
                let exact = exact == Some(true);
                let counted = match lock_wait {
                    None => Some(count_nulls(c, table, exact)?),
                    Some(wait) => count_nulls_waiting(c, table, exact, wait)?,
                };
                if counted.is_none() {
                    counts_blocked_by.extend(lock_holders(c, table)?);
                }
                Column {
                    exists: true,
                    nullable: true,
                    null_rows: counted.map(|(n, _)| n),
                    exact: counted.is_some_and(|(_, is_exact)| is_exact),
                }
            }
        })
    };
    let jobs_jobset_id = count(client, "jobs", jobs_col)?;
    let builds_jobset_id = count(client, "builds", builds_col)?;
    let backfill_progress = state::read_all(db)?;
    let mut held_rows = Vec::new();
    for table in crate::backfill::Table::ALL {
        let n = crate::backfill::held::listed(db.client(), table)?;
        if n > 0 {
            held_rows.push((table, n));
        }
    }
    let running = db.upgrade_lock_holder()?;
    let autoanalyze_held_off = if stage == Stage::BeforeMigration {
        Vec::new()
    } else {
        crate::backfill::autoanalyze::held_off(db)?
    };
    let mut status = Status {
        database: db.describe().to_owned(),
        schema_version: version,
        stage,
        jobsets_id,
        jobs_jobset_id,
        builds_jobset_id,
        final_indexes,
        backfill_progress,
        held_rows,
        running,
        autoanalyze_held_off,
        wal_prepared: crate::wal_prepare::prepared(db)?,
        counts_blocked_by,
        null_rows_counted: exact.is_some(),
        next_step: String::new(),
    };
    status.next_step = next_step(&status);
    Ok(status)
}

/// `Some(nullable)` if the column exists.
fn column(c: &mut postgres::Client, table: &str, col: &str) -> Result<Option<bool>> {
    let row = c.query_opt(
        "SELECT NOT a.attnotnull FROM pg_attribute a
          WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
        &[&table, &col],
    )?;
    Ok(row.map(|r| r.get(0)))
}

/// [`count_nulls`], giving up (`None`) when its table stays locked for `wait`.
fn count_nulls_waiting(
    c: &mut postgres::Client,
    table: &str,
    exact: bool,
    wait: Duration,
) -> Result<Option<(i64, bool)>> {
    let mut tx = c.transaction()?;
    tx.batch_execute(&crate::db::local_lock_timeout(wait))?;
    match count_nulls(&mut tx, table, exact) {
        Ok(counted) => {
            tx.commit()?;
            Ok(Some(counted))
        }
        Err(e)
            if crate::db::sqlstate(&e) == Some(postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The sessions holding a lock on `table` that conflicts with reading it, and those
/// queued for one: PostgreSQL queues a reader behind a waiting ACCESS EXCLUSIVE request
/// too (`hydra-init`'s ALTER TABLE behind a long Hydra transaction), so a waiting request
/// is named with the sessions it waits behind.
fn lock_holders(c: &mut postgres::Client, table: &str) -> Result<Vec<String>> {
    let rows = c.query(
        "SELECT a.pid, coalesce(nullif(a.application_name, ''), a.backend_type, ''),
                left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80),
                coalesce(extract(epoch FROM now() - a.xact_start)::bigint, 0),
                l.granted, array_to_string(pg_blocking_pids(a.pid), ', ')
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.relation = to_regclass($1) AND l.mode = 'AccessExclusiveLock'
          ORDER BY NOT l.granted, a.pid",
        &[&table],
    )?;
    Ok(rows
        .iter()
        .map(|r| {
            let (pid, app, query, secs, granted, behind): (i32, String, String, i64, bool, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            if granted {
                format!("{table}: pid {pid} ({app}) for {secs}s: {query}")
            } else {
                format!(
                    "{table}: pid {pid} ({app}) waits for its lock behind pid {behind}, for {secs}s: {query}"
                )
            }
        })
        .collect())
}

/// NULL jobset_id rows: exact for small tables or on request, else estimated from a 1 %
/// page sample. A sample that finds no NULL row cannot tell "none" from "a few": then the
/// count is exact (a full scan, but only once the backfill is about done, when `verify`
/// scans anyway).
fn count_nulls(c: &mut impl GenericClient, table: &str, exact: bool) -> Result<(i64, bool)> {
    let bytes: i64 = c
        .query_one("SELECT pg_relation_size(to_regclass($1))", &[&table])?
        .get(0);
    if !exact && bytes >= EXACT_BELOW_BYTES {
        // SYSTEM (1) reads about 1 % of the heap pages; scale the share of NULLs it saw
        // to the planner's row count (or to 100 x the sample before the first ANALYZE).
        let sql = format!(
            "SELECT count(*) FILTER (WHERE jobset_id IS NULL), count(*),
                    (SELECT reltuples::float8 FROM pg_class WHERE oid = to_regclass($1))
               FROM {table} TABLESAMPLE SYSTEM (1) REPEATABLE (42)"
        );
        let row = c
            .query_one(&sql, &[&table])
            .with_context(|| format!("sampling NULL rows in {table}"))?;
        let (nulls, rows, reltuples): (i64, i64, f64) = (row.get(0), row.get(1), row.get(2));
        if nulls > 0 {
            let total = if reltuples > 0.0 {
                reltuples
            } else {
                rows as f64 * 100.0
            };
            return Ok(((nulls as f64 / rows as f64 * total).round() as i64, false));
        }
    }
    let sql = format!("SELECT count(*) FROM {table} WHERE jobset_id IS NULL");
    let n: i64 = c
        .query_one(&sql, &[])
        .with_context(|| format!("counting NULL rows in {table}"))?
        .get(0);
    Ok((n, true))
}

fn next_step(s: &Status) -> String {
    let uncounted = s.null_rows().is_none();
    if uncounted && !s.null_rows_counted && s.stage == Stage::Migration {
        return "next: `hydra-upgrade backfill` for the NULL rows left (not counted here), \
                then verify and finalize."
            .into();
    }
    if uncounted && s.null_rows_counted && s.counts_blocked_by.is_empty() {
        return "next: a lock on the table kept the count from running, and was gone by the \
                time it was looked up: run `hydra-upgrade status` again."
            .into();
    }
    if uncounted && s.null_rows_counted {
        return "next: a session holds a lock on the table, or waits for one (see \"locked \
                by\"; during an upgrade step, hydra-init's): run `hydra-upgrade status` again \
                when it ends."
            .into();
    }
    match s.stage {
        Stage::BeforeMigration => format!(
            "next: switch to the migration package (pkgs.hydra-migration); its hydra-init adds \
             the jobset_id columns (schema {} -> 61, seconds). `hydra-upgrade upgrade` does it.",
            s.schema_version
        ),
        Stage::Migration if s.null_rows().is_some_and(|n| n > 0) => format!(
            "next: backfill jobset_id ({} NULL rows left) with `hydra-upgrade backfill` \
             while Hydra keeps serving, then verify and finalize.",
            s.null_rows_text().unwrap_or_default()
        ),
        Stage::Migration => "next: `hydra-upgrade verify`, then `hydra-upgrade finalize` (online \
             NOT NULL and indexes), then switch to the final package (pkgs.hydra-unstable). \
             `hydra-upgrade upgrade` does all three."
            .into(),
        Stage::Final => "nothing to do: the jobset_id upgrade is complete.".into(),
    }
}

/// Human-readable status.
pub fn render(s: &Status) -> String {
    let col = |c: &Column| match (c.exists, c.nullable, c.null_rows) {
        (false, _, _) => "absent".to_owned(),
        (true, false, _) => "NOT NULL".to_owned(),
        (true, true, None) if s.null_rows_counted => {
            "nullable, NULL rows not counted (table locked)".to_owned()
        }
        (true, true, None) => "nullable, NULL rows not counted".to_owned(),
        (true, true, Some(n)) => {
            format!("nullable, {}{n} NULL rows", if c.exact { "" } else { "~" })
        }
    };
    let mut out = format!(
        "database:          {}\nschema version:    {}\nstage:             {:?}\nJobsets.id:        {}\nJobs.jobset_id:    {}\nBuilds.jobset_id:  {}\n",
        s.database,
        s.schema_version,
        s.stage,
        if s.jobsets_id { "present" } else { "absent" },
        col(&s.jobs_jobset_id),
        col(&s.builds_jobset_id),
    );
    for (name, ok) in &s.final_indexes {
        out.push_str(&format!(
            "index {name}: {}\n",
            if *ok { "present" } else { "absent" }
        ));
    }
    for p in &s.backfill_progress {
        out.push_str(&format!(
            "backfill {}: {} at {} of {}, {} rows updated{}\n",
            p.table,
            p.strategy,
            p.position,
            p.total,
            p.rows_updated,
            if p.finished { ", finished" } else { "" }
        ));
    }
    for (table, n) in &s.held_rows {
        out.push_str(&format!(
            "backfill {}: {n} rows found locked by another transaction are still to be filled \
             (a re-run of backfill fills them)\n",
            table.name()
        ));
    }
    if let Some(who) = &s.running {
        out.push_str(&format!("running now:       hydra-upgrade {who}\n"));
    }
    for t in &s.autoanalyze_held_off {
        out.push_str(&format!(
            "autoanalyze of {} held off by hydra-upgrade{} (autovacuum_analyze_threshold)\n",
            t.name(),
            if s.running.is_some() {
                ""
            } else {
                "; a backfill was killed: the next backfill or finalize resets it"
            }
        ));
    }
    if s.wal_prepared {
        out.push_str(crate::wal_prepare::REMINDER);
        out.push('\n');
    }
    for who in &s.counts_blocked_by {
        out.push_str(&format!("locked by:         {who}\n"));
    }
    out.push_str(&s.next_step);
    out.push('\n');
    out
}
