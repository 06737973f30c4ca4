//! The online backfill of `Jobs.jobset_id` and `Builds.jobset_id`.
//!
//! Each table is walked once: by heap pages (per-page, HOT-friendly) followed by a keyset
//! sweep, or by keyset alone. Every batch is one short transaction under `lock_timeout`
//! and `statement_timeout`, retried with capped backoff on lock timeout, deadlock and
//! serialization failure; its size adapts towards a target time. No batch waits long
//! for a row lock: rows other transactions hold are filled after the walk, one at a
//! time ([`held`]). Progress is committed in the database, so a re-run continues; one
//! backfill at a time (advisory lock). Where it can, it keeps itself and its server
//! process on one CPU ([`one_cpu`]).

pub mod autoanalyze;
pub mod held;
pub mod keyset;
pub mod one_cpu;
pub mod per_page;
pub mod replication;
pub mod state;
pub mod wal_segments;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli::{BackfillArgs, StrategyChoice};
use crate::config::Config;
use crate::db::{self, Db};
use crate::exit::{Exit, fail};
use crate::interrupt::Interrupt;
use crate::progress::Out;
use one_cpu::PinCpu;
use state::{PHASE_DONE, PHASE_HELD, PHASE_KEYS, PHASE_PAGES, TableProgress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Jobs,
    Builds,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Jobs, Table::Builds];

    pub fn name(self) -> &'static str {
        match self {
            Table::Jobs => "jobs",
            Table::Builds => "builds",
        }
    }
}

/// Short rounds keep what Hydra's writes wait for small: row locks held by a round, and
/// the time our server process keeps a CPU at a stretch. At 100k builds 20 ms took the
/// same time as 50 or 200 ms and brought a Hydra-shaped writer's p99 during the
/// backfill from 4.4x (50 ms) to 2.3x its idle p99; at 1M, 1 ms rounds halved its waits
/// for a CPU but not its p99's ratio to 2x, at 1.6 times the backfill's time
/// (BENCHMARKS.md, "Shorter rounds").
pub const DEFAULT_TARGET_BATCH_MS: u64 = 20;

#[derive(Debug, Clone)]
pub struct Options {
    pub strategy: StrategyChoice,
    pub target_batch: Duration,
    pub pause: Duration,
    pub initial_batch: Option<u64>,
    pub max_batch: u64,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub max_retries: u32,
    /// A transaction or snapshot older than this defeats HOT pruning.
    pub horizon_age: Duration,
    /// Before a per-page round, wait up to this long for sessions whose snapshot predates
    /// the previous round (an autovacuum ANALYZE, a short report) to end.
    pub horizon_wait: Duration,
    /// Keep this tool and its server process on one CPU ([`one_cpu`]).
    pub pin_cpu: PinCpu,
    /// The watch on standbys and subscribers ([`replication`]).
    pub replication: replication::Settings,
}

impl Options {
    pub fn from_args(a: &BackfillArgs, config: &Config) -> Options {
        let cfg = config.backfill.clone().unwrap_or_default();
        Options {
            strategy: a.strategy.or(cfg.strategy).unwrap_or(StrategyChoice::Auto),
            target_batch: Duration::from_millis(
                a.target_batch_ms
                    .or(cfg.target_batch_ms)
                    .unwrap_or(DEFAULT_TARGET_BATCH_MS),
            ),
            pause: Duration::from_millis(a.pause_ms.or(cfg.pause_ms).unwrap_or(0)),
            initial_batch: a.batch_size,
            max_batch: a.max_batch_size.max(1),
            lock_timeout: Duration::from_millis(a.lock_timeout_ms),
            statement_timeout: Duration::from_millis(a.statement_timeout_ms),
            max_retries: a.max_retries,
            horizon_age: Duration::from_secs(a.horizon_age_secs),
            horizon_wait: Duration::from_millis(a.horizon_wait_ms),
            pin_cpu: a.pin_cpu.or(cfg.pin_cpu).unwrap_or(PinCpu::Auto),
            replication: replication::Settings::from_args(&a.replication, config),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableReport {
    pub table: Table,
    pub strategy: String,
    pub rows_updated: u64,
    pub rows_skipped: u64,
    pub transactions: u64,
    pub retries: u64,
    pub seconds: f64,
    pub why: String,
    /// Share of this table's row updates during the run that were HOT (no index entries).
    pub hot_share: Option<f64>,
    /// Table + indexes, before and after the run.
    pub bytes_before: i64,
    pub bytes_after: i64,
    /// Time spent waiting for older snapshots to end before per-page rounds.
    pub horizon_wait_seconds: f64,
    /// Per-page rounds whose short wait for a row another transaction held ran out, and
    /// rounds that left such rows to the sweep (`SKIP LOCKED`; see
    /// `per_page::RowWaits`).
    pub row_waits_given_up: u64,
    pub rounds_skipping_held_rows: u64,
    /// Rows the keyset walk found held, filled one at a time after it (`held`).
    pub held_rows_filled_after: u64,
    /// Time spent waiting for a standby or subscriber to catch up (`replication`).
    pub replication_wait_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tables: Vec<TableReport>,
    pub seconds: f64,
}

impl Report {
    pub fn rows_updated(&self) -> u64 {
        self.tables.iter().map(|t| t.rows_updated).sum()
    }

    /// The text summary `backfill` ends with: a line per table, then the next step.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for t in &self.tables {
            text += &format!(
                "{}: {} rows updated in {:.1}s ({}), {} orphans skipped{}\n",
                t.table.name(),
                t.rows_updated,
                t.seconds,
                t.strategy,
                t.rows_skipped,
                replication::waited_text(t.replication_wait_seconds)
            );
        }
        text + "next: `hydra-upgrade verify`\n"
    }
}

/// The smallest batch the adaptation goes to on its own, in heap pages (per-page) and in
/// keys (keyset); a `--max-batch-size` below it wins, and a statement timeout still
/// halves a batch below it. Besides its rows a batch has a fixed cost (round trips, the
/// commit); when that is most of `--target-batch-ms`, a smaller batch costs more per row
/// and the size fed on itself: at `--target-batch-ms 1` and 1M builds one run of three
/// went to 61,587 rounds of about 16 rows and took 75 s against 41 and 46 s, and the Jobs
/// walk went to batches of about one key (BENCHMARKS.md, "Shorter rounds").
const MIN_ADAPTIVE_PAGES: u64 = 32;
const MIN_ADAPTIVE_KEYS: u64 = 100;

/// After a finished walk, at most this many NULL rows are filled by key, one per
/// transaction, instead of walking the whole table again; with more the table is walked
/// (one row per transaction is slower per row than the walk's rounds). The list lives in
/// the database (`held`), not in the tool's memory.
const AFTER_A_WALK_LISTED_MAX: i64 = 50_000;

/// Batch size that adapts towards a target time per transaction: it follows an
/// exponential moving average of the time per unit, and moves at most 2x per step.
#[derive(Debug)]
struct Adaptive {
    size: u64,
    min: u64,
    max: u64,
    target: Duration,
    per_unit: Option<f64>,
}

impl Adaptive {
    fn new(initial: u64, min: u64, max: u64, target: Duration) -> Adaptive {
        Adaptive {
            // The first batch is what was asked for (`--batch-size`), the floor
            // applies from the first adaptation on.
            size: initial.clamp(1, max),
            min,
            max,
            target,
            per_unit: None,
        }
    }

    fn observe(&mut self, units: u64, took: Duration) {
        if units == 0 {
            return;
        }
        let sample = took.as_secs_f64() / units as f64;
        let ema = match self.per_unit {
            Some(prev) => 0.7 * prev + 0.3 * sample,
            None => sample,
        };
        self.per_unit = Some(ema);
        let want = (self.target.as_secs_f64() / ema.max(1e-9)) as u64;
        self.size = want
            .clamp(self.size / 2, self.size.saturating_mul(2))
            .clamp(self.min, self.max);
    }

    /// Halve the batch (down to one unit, below `min` if need be).
    fn shrink(&mut self) -> bool {
        let before = self.size;
        self.size = (self.size / 2).max(1);
        self.size < before
    }
}

/// Run one batch with retries: transient errors back off and retry (a stop asked for
/// meanwhile ends the wait and the run); a statement timeout halves the batch and
/// retries; a cancel that came before our statement_timeout ran out is someone else's
/// and stops the run.
fn with_retries<T>(
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
    what: &str,
    adaptive: &mut Adaptive,
    retries: &mut u64,
    mut op: impl FnMut(u64) -> Result<T>,
) -> Result<T> {
    let mut attempt = 0;
    loop {
        let began = Instant::now();
        match op(adaptive.size) {
            Ok(v) => return Ok(v),
            Err(e) if db::is_statement_timeout(&e) && !ran_out_its_time(opts, began) => {
                return Err(e.context(crate::exit::Failure::new(
                    Exit::Interrupted,
                    format!(
                        "{what}: PostgreSQL cancelled it after {:.1} s, before our statement_timeout \
                         ran out (an administrator's pg_cancel_backend?); every committed batch is \
                         kept. Run the same command again to continue",
                        began.elapsed().as_secs_f64()
                    ),
                )));
            }
            Err(e) if db::is_statement_timeout(&e) && adaptive.shrink() => {
                out.warn(&format!(
                    "{what}: statement timeout, batch halved to {}",
                    adaptive.size
                ));
            }
            Err(e) if db::is_transient(&e) && attempt < opts.max_retries => {
                let wait = db::backoff(attempt, Duration::from_millis(50), Duration::from_secs(10));
                out.warn(&format!(
                    "{what}: {e:#}; retry {} in {} ms",
                    attempt + 1,
                    wait.as_millis()
                ));
                if interrupt.sleep(wait) {
                    return Err(e.context(crate::exit::Failure::new(
                        Exit::Interrupted,
                        format!(
                            "interrupted while {what} waited to be retried; every committed \
                             batch is kept. Run the same command again to continue"
                        ),
                    )));
                }
                // Only lock contention counts against --max-retries; halvings have their
                // own end (a batch of one).
                attempt += 1;
            }
            Err(e) if db::is_statement_timeout(&e) => {
                return Err(e.context(crate::exit::Failure::new(
                    Exit::Internal,
                    format!(
                        "{what}: even a batch of one page or key ran past the statement_timeout of {} ms: the \
                         server is overloaded, or the limit is too small for it. Every committed \
                         batch is kept; run the same command again with a larger \
                         --statement-timeout-ms",
                        opts.statement_timeout.as_millis()
                    ),
                )));
            }
            Err(e) if db::is_transient(&e) => {
                return Err(e.context(crate::exit::Failure::new(
                    Exit::RetriesExhausted,
                    format!(
                        "{what} still failed after {} retries because of lock contention \
                         (committed work is kept; re-run later, or raise --lock-timeout-ms / \
                         --max-retries)",
                        opts.max_retries
                    ),
                )));
            }
            Err(e) => return Err(e),
        }
        *retries += 1;
    }
}

/// Did a statement cancelled with SQLSTATE 57014 run out our statement_timeout? A cancel
/// that comes sooner is someone else's (`pg_cancel_backend`): halving the batch and going
/// on would ignore it, so the run stops as on Ctrl-C. (A batch is a few statements, each
/// under the timeout: one that ended sooner than the whole timeout was not cut off by it.)
fn ran_out_its_time(opts: &Options, began: Instant) -> bool {
    !opts.statement_timeout.is_zero() && began.elapsed() >= opts.statement_timeout
}

/// Waiting out short-lived snapshots before a per-page round. A round's HOT updates need
/// the previous round's dead versions pruned, which no session with an older snapshot
/// (or, idle in its transaction, an older transaction id) allows: an autovacuum ANALYZE
/// of Builds (which the backfill itself triggers) holds one for seconds, and every round
/// in that time moves its rows to other pages. So each round waits, at most `max`
/// (polling every 10 ms), for such sessions to end. A session that stays in the way for
/// more than 15 s (a long report, pg_dump) is named once and no longer waited for.
struct HorizonWait {
    max: Duration,
    first_seen: HashMap<i32, Instant>,
    ignored: HashSet<i32>,
    waited: Duration,
}

impl HorizonWait {
    const GIVE_UP: Duration = Duration::from_secs(15);

    fn new(max: Duration) -> HorizonWait {
        HorizonWait {
            max,
            first_seen: HashMap::new(),
            ignored: HashSet::new(),
            waited: Duration::ZERO,
        }
    }

    fn wait(
        &mut self,
        db: &mut Db,
        st: &per_page::RoundStatements,
        xid: &str,
        out: &Out,
    ) -> Result<()> {
        if self.max.is_zero() {
            return Ok(());
        }
        let start = Instant::now();
        loop {
            let holders: Vec<(i32, String)> = per_page::horizon_holders(db.client(), st, xid)?
                .into_iter()
                .filter(|(pid, _)| !self.ignored.contains(pid))
                .collect();
            let now = Instant::now();
            self.first_seen
                .retain(|pid, _| holders.iter().any(|(p, _)| p == pid));
            for (pid, what) in &holders {
                let since = *self.first_seen.entry(*pid).or_insert(now);
                if now - since > Self::GIVE_UP {
                    self.ignored.insert(*pid);
                    out.warn(&format!(
                        "pid {pid} ({what}) has kept old row versions from being pruned for over \
                         {}s; no longer waiting for it, so updates are not HOT while it runs",
                        Self::GIVE_UP.as_secs()
                    ));
                }
            }
            if holders.is_empty() || start.elapsed() >= self.max {
                self.waited += start.elapsed();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Things that keep PostgreSQL from pruning dead row versions, which HOT updates need.
pub fn hot_blockers(db: &mut Db, table: Table, horizon_age: Duration) -> Result<Vec<String>> {
    let mut why = Vec::new();
    let idx = db.client().query(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = to_regclass($1) AND pg_get_indexdef(i.indexrelid) ILIKE '%jobset_id%'",
        &[&table.name()],
    )?;
    for r in idx {
        let name: String = r.get(0);
        why.push(format!(
            "index {name} contains jobset_id, so no update of it can be HOT"
        ));
    }
    let secs = horizon_age.as_secs_f64();
    let sql = format!(
        "SELECT pid, coalesce(datname::text, ''), coalesce(application_name, ''),
                extract(epoch FROM now() - coalesce(xact_start, backend_start))::bigint
           FROM pg_stat_activity
          WHERE pid <> pg_backend_pid()
            AND (backend_xid IS NOT NULL
                 OR backend_xmin IS NOT NULL AND NOT {} AND {})
            AND now() - coalesce(xact_start, backend_start) > make_interval(secs => $1)
          ORDER BY 4 DESC LIMIT 5",
        per_page::PLAIN_VACUUM,
        per_page::SNAPSHOT_COUNTS_HERE
    );
    let old = db.client().query(&sql, &[&secs])?;
    for r in old {
        let (pid, dbname, app, age): (i32, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        why.push(format!(
            "pid {pid} (database {dbname:?}, application {app:?}) holds a snapshot or transaction \
             open for {age}s; dead rows cannot be pruned until it ends"
        ));
    }
    let prepared = db.client().query(
        "SELECT gid, extract(epoch FROM now() - prepared)::bigint FROM pg_prepared_xacts
          WHERE now() - prepared > make_interval(secs => $1)",
        &[&secs],
    )?;
    for r in prepared {
        let (gid, age): (String, i64) = (r.get(0), r.get(1));
        why.push(format!("prepared transaction {gid:?} is {age}s old"));
    }
    // Only a slot's `xmin` (a physical slot fed by hot_standby_feedback) holds back the
    // pruning of user tables, in every database; a logical slot's `catalog_xmin` only
    // holds back the system catalogs, which HOT on Builds does not care about. Even a
    // standby with no query running holds it back: its xmin moves only with its feedback,
    // every wal_receiver_status_interval (10 s), while a page's rows are all updated
    // within about a second.
    let slots = db.client().query(
        "SELECT slot_name::text, active, age(xmin)::bigint FROM pg_replication_slots
          WHERE xmin IS NOT NULL",
        &[],
    )?;
    for r in slots {
        let (name, active, age): (String, bool, i64) = (r.get(0), r.get(1), r.get(2));
        why.push(if active {
            format!(
                "replication slot {name} holds back the xmin horizon ({age} transactions): its \
                 standby runs with hot_standby_feedback = on; turned off there for the \
                 backfill (queries on the standby may then be cancelled), HOT can work"
            )
        } else {
            format!(
                "replication slot {name}, with no standby connected, holds back the xmin \
                 horizon ({age} transactions) where its standby left it; drop it if that \
                 standby is gone for good"
            )
        });
    }
    Ok(why)
}

/// (updates, HOT updates, total bytes) of a table as the statistics system reports them.
fn table_stats(db: &mut Db, table: Table) -> Result<(i64, i64, i64)> {
    let row = db.client().query_one(
        "SELECT coalesce(n_tup_upd, 0), coalesce(n_tup_hot_upd, 0), pg_total_relation_size(relid)
           FROM pg_stat_user_tables WHERE relid = to_regclass($1)",
        &[&table.name()],
    )?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// How long to wait, after the last batch, for the statistics to count our updates.
const STATS_WAIT: Duration = Duration::from_secs(5);

/// The HOT share of the updates since `before` and the size now, once the statistics
/// count at least the `ours` updates this run made. From PostgreSQL 15 the session's
/// counters are flushed on request; before, a session sends them at most every 0.5 s
/// and the collector writes them out a little later, so we ask again until they are in
/// (up to [`STATS_WAIT`]). None when they never arrive (e.g. `track_counts` is off).
fn stats_after(
    db: &mut Db,
    table: Table,
    before: (i64, i64, i64),
    ours: u64,
) -> Result<(Option<f64>, i64)> {
    let flush = if db.server_version()? >= 150_000 {
        "SELECT pg_stat_force_next_flush()"
    } else {
        // Ends the transaction (so the backend reports its counters when due) and makes
        // the next read take fresh statistics.
        "SELECT pg_stat_clear_snapshot()"
    };
    let start = Instant::now();
    loop {
        db.client().batch_execute(flush)?;
        let after = table_stats(db, table)?;
        let updates = after.0 - before.0;
        if ours == 0 || updates >= ours as i64 {
            let share = (updates > 0).then(|| (after.1 - before.1) as f64 / updates as f64);
            return Ok((share, after.2));
        }
        if start.elapsed() >= STATS_WAIT {
            return Ok((None, after.2));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `FROM` and `WHERE` of a table's rows a backfill fills (as `t`): jobset_id NULL, and a
/// jobset (`js`) to take it from. Orphans are left out.
fn fillable_rows(table: Table) -> String {
    format!(
        "{t} AS t JOIN jobsets js ON js.project = t.project AND js.name = t.jobset
          WHERE t.jobset_id IS NULL",
        t = table.name()
    )
}

/// Does the table hold any NULL jobset_id row that can be filled (its jobset exists)?
///
/// With none or few left (a rerun after a finished walk) this reads the whole table, which
/// at tens of millions of builds can take longer than the backfill's statement_timeout
/// meant for its short batches; it blocks nothing, so it runs without that limit.
fn has_fillable(db: &mut Db, table: Table) -> Result<bool> {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", fillable_rows(table));
    let context = || format!("looking for NULL rows in {}", table.name());
    let mut tx = db
        .transaction_without_statement_timeout()
        .with_context(context)?;
    let found = tx.query_one(&sql, &[]).with_context(context)?.get(0);
    tx.commit().with_context(context)?;
    Ok(found)
}

/// Fill both tables. The caller has checked the stage (the columns exist).
///
/// The session's timeouts and asynchronous commit are the backfill's own and are reset
/// when it ends, failed or not: `upgrade` goes on with the same connection, and its
/// verify (a count over all of Builds, minutes at tens of millions of rows) must not be
/// cut off at the backfill's statement_timeout, nor finalize's commits be asynchronous.
pub fn run(db: &mut Db, opts: &Options, out: &Out, interrupt: &Interrupt) -> Result<Report> {
    db.take_upgrade_lock_waiting(interrupt, out)?;
    db.with_own_settings(|db| {
        db.set_timeouts(opts.lock_timeout, opts.statement_timeout)?;
        // With synchronous replication, Hydra's commits wait until the standby has stored
        // all WAL before their commit record, ours included; asynchronous commits of ours
        // would let that backlog grow to the replication lag limit. Committing as Hydra
        // does keeps it to one transaction of ours. Only where commits do wait for a
        // standby: with synchronous_commit local or off nobody's do.
        let standbys = crate::wal_prepare::setting(db, "synchronous_standby_names")?;
        let commit = crate::wal_prepare::setting(db, "synchronous_commit")?;
        let waits_for_standby = !standbys.trim().is_empty()
            && ["on", "remote_write", "remote_apply"].contains(&commit.as_str());
        if waits_for_standby {
            out.event(
                "synchronous-replication",
                &format!(
                    "backfill: synchronous replication is on (synchronous_standby_names = \
                     '{standbys}', synchronous_commit = {commit}): each of our commits waits \
                     for the standby as Hydra's do, so that Hydra's never wait behind a \
                     backlog of ours"
                ),
                json!({"synchronous_standby_names": standbys, "synchronous_commit": commit}),
            );
        } else {
            db.async_commit()?;
        }
        run_in_session(db, opts, out, interrupt)
    })
}

/// [`run`] with its session settings in place.
fn run_in_session(db: &mut Db, opts: &Options, out: &Out, interrupt: &Interrupt) -> Result<Report> {
    let start = Instant::now();
    state::ensure(db)?;
    held::ensure(db)?;
    // Held until the walk ends, then both processes get their CPUs back.
    let _pinned = pin_to_one_cpu(db, opts.pin_cpu, out)?;
    let mut lag = replication::LagWatch::new(opts.replication, replication::Waiter::Backfill);
    let mut walked = Vec::new();
    for table in Table::ALL {
        match run_table(db, table, opts, out, interrupt, &mut lag) {
            Ok(done) => walked.push(done),
            Err(e) => {
                // Best effort: the connection may be what failed.
                let _ = autoanalyze::release(db, out, false);
                return Err(e);
            }
        }
    }
    autoanalyze::release(db, out, false)?;
    // After the last batch, so that PostgreSQL < 15 makes us wait for its statistics
    // once, not once per table.
    let mut tables = Vec::new();
    for (mut report, before) in walked {
        if report.strategy == "none" {
            // Nothing was walked: Hydra's own updates meanwhile are not ours to report.
            tables.push(report);
            continue;
        }
        let (hot_share, bytes_after) = stats_after(db, report.table, before, report.rows_updated)?;
        report.hot_share = hot_share;
        report.bytes_after = bytes_after;
        tables.push(report);
    }
    Ok(Report {
        tables,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn pin_to_one_cpu(db: &mut Db, choice: PinCpu, out: &Out) -> Result<Option<one_cpu::Pinned>> {
    match one_cpu::pin(db, choice)? {
        Ok(p) => {
            out.event(
                "pinned",
                &format!(
                    "backfill: this tool and PostgreSQL's server process (pid {}) share CPU {}; \
                     Hydra keeps the others",
                    p.server_pid, p.cpu
                ),
                json!({"cpu": p.cpu, "server_pid": p.server_pid}),
            );
            Ok(Some(p))
        }
        Err(why) => {
            let message = format!("backfill: not kept on one CPU: {why}");
            match choice {
                PinCpu::Off => {}
                // Asked for by number: worth a warning.
                PinCpu::Cpu(_) => out.warn(&message),
                PinCpu::Auto => out.event("not_pinned", &message, json!({"why": why})),
            }
            Ok(None)
        }
    }
}

fn choose(db: &mut Db, table: Table, opts: &Options, out: &Out) -> Result<(&'static str, String)> {
    let blockers = hot_blockers(db, table, opts.horizon_age)?;
    for b in &blockers {
        out.warn(&format!("{}: HOT updates are defeated: {b}", table.name()));
    }
    Ok(match opts.strategy {
        _ if table == Table::Jobs => (
            "keyset",
            "Jobs has one index, so the keyset walk serves it".into(),
        ),
        StrategyChoice::Keyset => ("keyset", "chosen with --strategy keyset".into()),
        StrategyChoice::PerPage => ("per-page", "chosen with --strategy per-page".into()),
        StrategyChoice::Auto if blockers.is_empty() => {
            ("per-page", "auto: nothing defeats HOT updates".into())
        }
        StrategyChoice::Auto => ("keyset", format!("auto: {}", blockers.join("; "))),
    })
}

/// Walk one table. The report's `hot_share` and `bytes_after` are filled in by [`run`]
/// from the statistics, for which it also gets the counters before the walk.
fn run_table(
    db: &mut Db,
    table: Table,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
    lag: &mut replication::LagWatch,
) -> Result<(TableReport, (i64, i64, i64))> {
    let start = Instant::now();
    let waited_before = lag.waited;
    let name = table.name();
    let before = table_stats(db, table)?;
    let resume_hint = "Run the same command again to continue from the last committed batch.";
    let mut why = String::from("resumed from saved progress");
    let mut progress = match state::load(db, name)? {
        Some(p) if !p.finished => {
            out.event(
                "resume",
                &format!(
                    "{name}: resuming the {} walk ({} phase) at {} of {}",
                    p.strategy, p.phase, p.position, p.total
                ),
                json!({"table": name, "position": p.position, "phase": p.phase}),
            );
            p
        }
        previous => {
            let after_a_walk = previous.as_ref().is_some_and(|p| p.finished);
            let listed = if after_a_walk {
                held::list_nulls(db, table, AFTER_A_WALK_LISTED_MAX)?
            } else {
                None
            };
            let fillable = match listed {
                Some(n) => n > 0,
                None => has_fillable(db, table)?,
            };
            if !fillable {
                let skipped = previous.map(|p| p.rows_skipped).unwrap_or(0);
                out.event(
                    "table_done",
                    &format!("{name}: no NULL jobset_id row to fill"),
                    json!({"table": name}),
                );
                let report = TableReport {
                    table,
                    strategy: "none".into(),
                    rows_updated: 0,
                    rows_skipped: skipped as u64,
                    transactions: 0,
                    retries: 0,
                    seconds: start.elapsed().as_secs_f64(),
                    why: "nothing to fill".into(),
                    hot_share: None,
                    bytes_before: before.2,
                    bytes_after: before.2,
                    horizon_wait_seconds: 0.0,
                    row_waits_given_up: 0,
                    rounds_skipping_held_rows: 0,
                    held_rows_filled_after: 0,
                    replication_wait_seconds: 0.0,
                };
                return Ok((report, before));
            }
            let (strategy, reason) = match listed {
                Some(n) => (
                    "listed",
                    format!(
                        "a finished walk left {n} NULL rows to fill (an older evaluator's?): \
                         listed in one read and filled one at a time, not walked again"
                    ),
                ),
                None => choose(db, table, opts, out)?,
            };
            why = reason;
            out.event(
                "strategy",
                &format!("{name}: strategy {strategy} ({why})"),
                json!({"table": name, "strategy": strategy, "why": why}),
            );
            let p = if let Some(n) = listed {
                let mut p = TableProgress::new(name, strategy, PHASE_HELD, n);
                p.rows_skipped = previous.map_or(0, |p| p.rows_skipped);
                p
            } else if strategy == "per-page" {
                TableProgress::new(
                    name,
                    strategy,
                    PHASE_PAGES,
                    per_page::pages(db.client(), table)?,
                )
            } else {
                start_keys(db, table, TableProgress::new(name, strategy, PHASE_KEYS, 0))?
            };
            state::save(db.client(), &p)?;
            p
        }
    };
    let rows_before = progress.rows_updated;
    if table == Table::Builds {
        let remaining = wal_segments::remaining(Some(&progress));
        if remaining > 0.0 {
            wal_segments::check(db, table, remaining, out)?;
        }
    }
    let mut horizon = HorizonWait::new(opts.horizon_wait);
    let mut transactions = 0u64;
    let mut retries = 0u64;
    let (mut row_waits_given_up, mut rounds_skipping_held_rows) = (0, 0);
    let mut held_rows_filled_after = 0;

    // Jobs too: its autoanalyze, triggered by its own walk, holds the same horizon
    // while Builds is walked.
    autoanalyze::hold_off(db, table, out)?;
    if progress.phase == PHASE_PAGES {
        // At most 4096 pages in the window (about 180,000 listed ids, under 1 MB) keeps
        // memory small.
        let max = opts.max_batch.min(4096);
        let mut adaptive = Adaptive::new(
            opts.initial_batch.unwrap_or(64),
            MIN_ADAPTIVE_PAGES.min(max),
            max,
            opts.target_batch,
        );
        let mut bar = out.progress(name, progress.total as u64, "pages");
        let mut last_check = Instant::now();
        let mut last_save = Instant::now();
        let mut note = String::new();
        let mut last_xid: Option<String> = None;
        let mut window = per_page::Window::new(progress.position);
        let listing =
            per_page::Listing::for_server(db.server_version()?, per_page::block_size(db.client())?);
        let statements = per_page::RoundStatements::prepare(db.client(), table)?;
        let deadlock_timeout = crate::wal_prepare::setting(db, "deadlock_timeout")?
            .parse()
            .map(Duration::from_millis)
            .context("reading deadlock_timeout")?;
        let mut row_waits = per_page::RowWaits::new(deadlock_timeout, opts.lock_timeout);
        loop {
            // Saved about every second (and before stopping): a re-run lists again from
            // the lowest unfinished page, where only rows still NULL are found.
            if interrupt.requested() || last_save.elapsed() >= Duration::from_secs(1) {
                progress.position = window.resume_from();
                state::save(db.client(), &progress)?;
                bar.update(
                    progress.position as u64,
                    (progress.rows_updated - rows_before) as u64,
                    &note,
                );
                last_save = Instant::now();
                interrupt.check(resume_hint)?;
            }
            if let Some(behind) = lag.behind(db, name, out)? {
                progress.position = window.resume_from();
                state::save(db.client(), &progress)?;
                lag.wait(db, name, behind, out, interrupt, resume_hint)?;
            }
            // Something that defeats HOT can start at any time (a forgotten psql session,
            // a long report): look again every 30 s and say so.
            if last_check.elapsed() >= Duration::from_secs(30) {
                last_check = Instant::now();
                let blockers = hot_blockers(db, table, opts.horizon_age)?;
                for b in &blockers {
                    out.warn(&format!("{name}: HOT updates are defeated right now: {b}"));
                }
                note = if blockers.is_empty() {
                    String::new()
                } else {
                    " (HOT blocked, see warnings)".into()
                };
            }
            // Keep a few rounds' worth of pages listed ahead, listed a few rounds' worth
            // at a time: a listing reads its pages into shared buffers, and one that
            // listed a whole window at once (tens of ms at 1M builds) held up Hydra's
            // writes.
            let need = window.per_round(adaptive.size as usize);
            // A listing cut off by the statement timeout halves the rounds, and is tried
            // again over the fewer pages that rounds of the new size need.
            while window.waiting() < 2 * need && window.next_to_list() < progress.total {
                let first = window.next_to_list();
                let (pages, to) = with_retries(
                    opts,
                    out,
                    interrupt,
                    &format!("{name} page listing"),
                    &mut adaptive,
                    &mut retries,
                    |size| {
                        let to = window.listing_end(size as usize, progress.total);
                        per_page::list_pages(db.client(), table, listing, first, to - first)
                            .map(|pages| (pages, to))
                    },
                )?;
                window.add_listed(pages, to);
            }
            if window.is_empty() && window.next_to_list() >= progress.total {
                break;
            }
            window.admit(adaptive.size as usize);
            if let Some(xid) = &last_xid {
                horizon.wait(db, &statements, xid, out)?;
            }
            let t0 = Instant::now();
            let (updated, xid, n) = with_retries(
                opts,
                out,
                interrupt,
                &format!("{name} round"),
                &mut adaptive,
                &mut retries,
                |size| {
                    let ids = window.peek(size as usize);
                    per_page::update_round(db.client(), &statements, &ids, &mut row_waits)
                        .map(|(updated, xid)| (updated, xid, ids.len()))
                },
            )?;
            adaptive.observe(n as u64, t0.elapsed());
            window.advance(n);
            last_xid = xid;
            transactions += 1;
            progress.rows_updated += updated as i64;
            if !opts.pause.is_zero() {
                std::thread::sleep(opts.pause);
            }
        }
        progress.position = progress.total;
        state::save(db.client(), &progress)?;
        bar.update(
            progress.position as u64,
            (progress.rows_updated - rows_before) as u64,
            "",
        );
        row_waits_given_up = row_waits.given_up;
        rounds_skipping_held_rows = row_waits.skipping;
        bar.finish(" (page walk done, sweeping for rows moved meanwhile)");
        progress = start_keys(db, table, progress)?;
        state::save(db.client(), &progress)?;
    }

    if progress.phase == PHASE_KEYS {
        let mut cursor: keyset::Cursor =
            serde_json::from_str(progress.cursor.as_deref().unwrap_or("null"))
                .with_context(|| format!("reading the saved keyset cursor of {name}"))?;
        let initial = opts.initial_batch.unwrap_or(1_000);
        let mut adaptive = Adaptive::new(
            initial,
            MIN_ADAPTIVE_KEYS.min(opts.max_batch),
            opts.max_batch,
            opts.target_batch,
        );
        let mut bar = out.progress(name, progress.total as u64, "keys");
        let rows_at_sweep = progress.rows_updated;
        loop {
            interrupt.check(resume_hint)?;
            if let Some(behind) = lag.behind(db, name, out)? {
                lag.wait(db, name, behind, out, interrupt, resume_hint)?;
            }
            let t0 = Instant::now();
            let (batch, next) = with_retries(
                opts,
                out,
                interrupt,
                &format!("{name} keyset batch"),
                &mut adaptive,
                &mut retries,
                |size| {
                    let mut next = cursor.clone();
                    let mut p = progress.clone();
                    let mut tx = db.client().transaction()?;
                    let b = keyset::batch(&mut tx, &mut next, size)?;
                    p.position += b.walked as i64;
                    p.rows_updated += b.updated as i64;
                    p.rows_skipped += b.skipped as i64;
                    p.cursor = Some(serde_json::to_string(&next)?);
                    state::save(&mut tx, &p)?;
                    tx.commit()?;
                    Ok((b, (next, p)))
                },
            )?;
            (cursor, progress) = next;
            adaptive.observe(batch.walked.max(1), t0.elapsed());
            transactions += 1;
            bar.update(
                progress.position as u64,
                (progress.rows_updated - rows_at_sweep) as u64,
                "",
            );
            if batch.done {
                break;
            }
            if !opts.pause.is_zero() {
                std::thread::sleep(opts.pause);
            }
        }
        bar.finish("");
        progress.phase = PHASE_HELD.into();
        state::save(db.client(), &progress)?;
    }
    if progress.phase == PHASE_HELD {
        let (filled, fill_retries) =
            fill_held(db, table, opts, out, interrupt, lag, &mut progress)?;
        held_rows_filled_after = filled;
        retries += fill_retries;
        transactions += held_rows_filled_after;
        progress.phase = PHASE_DONE.into();
        progress.finished = true;
        state::save(db.client(), &progress)?;
    }
    if progress.rows_skipped > 0 {
        out.warn(&format!(
            "{name}: {} NULL rows match no jobset (orphans) and were left as they are; \
             `hydra-upgrade verify` lists them",
            progress.rows_skipped
        ));
    }
    let report = TableReport {
        hot_share: None,
        bytes_before: before.2,
        bytes_after: before.2,
        horizon_wait_seconds: horizon.waited.as_secs_f64(),
        row_waits_given_up,
        rounds_skipping_held_rows,
        held_rows_filled_after,
        replication_wait_seconds: (lag.waited - waited_before).as_secs_f64(),
        table,
        strategy: progress.strategy.clone(),
        rows_updated: (progress.rows_updated - rows_before) as u64,
        rows_skipped: progress.rows_skipped as u64,
        transactions,
        retries,
        seconds: start.elapsed().as_secs_f64(),
        why,
    };
    Ok((report, before))
}

/// After the keyset walk: the rows other transactions held when the walk came to them,
/// one per transaction, each waiting for its lock (see `held`). Returns how many there
/// were (one transaction each) and how many retries they took.
fn fill_held(
    db: &mut Db,
    table: Table,
    opts: &Options,
    out: &Out,
    interrupt: &Interrupt,
    lag: &mut replication::LagWatch,
    progress: &mut TableProgress,
) -> Result<(u64, u64)> {
    let name = table.name();
    let listed = held::count(db.client(), table)?;
    if listed == 0 {
        return Ok((0, 0));
    }
    // Listed by the walk (held by others when it came to them), or listed instead of a
    // walk (after a finished one).
    if progress.strategy != "listed" {
        out.event(
            "held",
            &format!(
                "{name}: {listed} rows were locked by other transactions when the walk came \
                 to them (Hydra's evaluator holds a jobset's current builds while it stores \
                 an evaluation); filling them one at a time, each waiting for its lock"
            ),
            json!({"table": name, "rows": listed}),
        );
    }
    // One row per transaction: never halved, never grown.
    let mut single = Adaptive::new(1, 1, 1, opts.target_batch);
    let wait = held::row_wait(opts.lock_timeout, opts.statement_timeout);
    let capped = wait != opts.lock_timeout;
    let (mut transactions, mut retries) = (0, 0);
    let resume_hint = "Run the same command again to fill the rows left.";
    while let Some(key) = held::first(db.client(), table)? {
        interrupt.check(resume_hint)?;
        if let Some(behind) = lag.behind(db, name, out)? {
            lag.wait(db, name, behind, out, interrupt, resume_hint)?;
        }
        let filled = with_retries(
            opts,
            out,
            interrupt,
            &format!("{name} row {key} (held by another transaction)"),
            &mut single,
            &mut retries,
            |_| {
                let mut p = progress.clone();
                let mut tx = db.client().transaction()?;
                match held::fill(&mut tx, &key, wait)? {
                    held::Filled::Updated => p.rows_updated += 1,
                    held::Filled::Orphan => p.rows_skipped += 1,
                    held::Filled::Already => {}
                }
                state::save(&mut tx, &p)?;
                tx.commit()?;
                Ok(p)
            },
        );
        *progress = match filled {
            Err(e) if capped && crate::exit::exit_of(&e) == Exit::RetriesExhausted => {
                return Err(e.context(format!(
                    "each wait for the row's lock was cut to {} ms, half the \
                     statement_timeout: raise --statement-timeout-ms too for longer waits",
                    wait.as_millis()
                )));
            }
            other => other?,
        };
        transactions += 1;
    }
    Ok((transactions, retries))
}

/// Enter the keyset phase: a fresh cursor from the start of the table.
fn start_keys(db: &mut Db, table: Table, mut p: TableProgress) -> Result<TableProgress> {
    let cursor = keyset::Cursor::start(db.client(), table)?;
    p.total = match &cursor {
        keyset::Cursor::Id { upper, .. } => *upper,
        keyset::Cursor::Key { .. } => {
            let n: f32 = db
                .client()
                .query_one(
                    "SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = to_regclass('jobs')",
                    &[],
                )?
                .get(0);
            n as i64
        }
    };
    p.phase = PHASE_KEYS.into();
    p.position = 0;
    p.cursor = Some(serde_json::to_string(&cursor)?);
    Ok(p)
}

/// Refuse to backfill where it does not apply.
pub fn require_columns(status: &crate::status::Status) -> Result<()> {
    if !status.jobs_jobset_id.exists || !status.builds_jobset_id.exists {
        return Err(fail(
            Exit::WrongPhase,
            format!(
                "the jobset_id columns do not exist yet (schema {}): switch to the migration \
                 package first (`hydra-upgrade upgrade` does it), then backfill.",
                status.schema_version
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_says_each_tables_wait_for_standbys_only_when_there_was_one() {
        let table = |table, rows_updated, replication_wait_seconds| TableReport {
            table,
            strategy: "per-page".into(),
            rows_updated,
            rows_skipped: 1,
            transactions: 10,
            retries: 0,
            seconds: 2.04,
            why: String::new(),
            hot_share: Some(0.96),
            bytes_before: 100,
            bytes_after: 102,
            horizon_wait_seconds: 0.0,
            row_waits_given_up: 0,
            rounds_skipping_held_rows: 0,
            held_rows_filled_after: 0,
            replication_wait_seconds,
        };
        let report = Report {
            tables: vec![table(Table::Jobs, 5, 0.0), table(Table::Builds, 900, 31.46)],
            seconds: 35.0,
        };
        assert_eq!(
            report.render(),
            "jobs: 5 rows updated in 2.0s (per-page), 1 orphans skipped\n\
             builds: 900 rows updated in 2.0s (per-page), 1 orphans skipped; waited 31.5s for standbys\n\
             next: `hydra-upgrade verify`\n"
        );
    }

    #[test]
    fn a_fixed_cost_over_the_target_does_not_shrink_batches_below_the_floor() {
        let mut a = Adaptive::new(64, 32, 4096, Duration::from_millis(1));
        for _ in 0..50 {
            // 2 ms a batch whatever its size, 10 us a unit: over the target at any size.
            let took = Duration::from_micros(2_000 + 10 * a.size);
            a.observe(a.size, took);
        }
        assert_eq!(a.size, 32);
        // Without a fixed cost it settles where a batch takes the target: 100 units.
        let mut b = Adaptive::new(64, 32, 4096, Duration::from_millis(1));
        for _ in 0..50 {
            b.observe(b.size, Duration::from_micros(10 * b.size));
        }
        assert_eq!(b.size, 100);
    }

    #[test]
    fn a_fixed_cost_under_the_target_settles_where_a_batch_takes_the_target() {
        // time = a + b n with a < target: the time per unit seen (a / n + b) feeds the
        // size n -> target n / (a + b n), whose fixed point (target - a) / b is stable
        // (slope a / target < 1): 0.5 ms + 10 us a unit, 1 ms target -> 50 units. So
        // modelling time as proportional to the units sizes batches right as long as the
        // fixed cost is under the target; over it, the floor takes over (test above).
        let mut a = Adaptive::new(400, 1, 4096, Duration::from_millis(1));
        for _ in 0..200 {
            a.observe(a.size, Duration::from_micros(500 + 10 * a.size));
        }
        assert!((49..=51).contains(&a.size), "settled at {}", a.size);
    }

    #[test]
    fn a_statement_timeout_halves_below_the_floor_down_to_one() {
        let mut a = Adaptive::new(8, 32, 4096, Duration::from_millis(20));
        assert_eq!(a.size, 8, "the first batch is the one asked for");
        assert!(a.shrink());
        assert_eq!(a.size, 4);
        assert!(a.shrink() && a.shrink());
        assert_eq!(a.size, 1);
        assert!(!a.shrink());
    }
}
