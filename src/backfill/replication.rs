//! Standbys and logical subscribers that fall behind the backfill.
//!
//! The walk writes WAL as fast as one server process can (a 10M-build walk about 7.7 GB
//! in six minutes, BENCHMARKS.md), far faster than Hydra does. A standby that cannot keep
//! up does harm on the primary: with a replication slot, PostgreSQL keeps every WAL
//! segment the standby has not confirmed, and `pg_wal` grows until the disk is full (the
//! server then stops, Hydra with it); without a slot, a standby that falls behind past what
//! `pg_wal` keeps can no longer follow and has to be cloned again.
//!
//! So between transactions the backfill looks, at most once a second, at how much WAL
//! each connected walsender (`pg_stat_replication`: a streaming standby, a logical
//! subscriber, `pg_receivewal`) has written here that its receiver has not yet confirmed
//! as stored, and while one is more than the limit behind it waits, holding no lock and no
//! transaction, until that one is within half the limit (or gone). A receiver that stores
//! nothing for `--replication-stall-secs` ends the run (exit 17) rather than hold it for
//! ever. A slot with no receiver connected is not waited for (waiting would not bring it
//! closer); `plan` and the backfill name it, with the WAL it keeps.
//!
//! With synchronous replication the backfill's own commits wait for the standby as
//! Hydra's do (see [`super::run`]), so its WAL never runs ahead of the standby by more
//! than one transaction; the limit then only matters for the other walsenders.
//!
//! The final phase ([`crate::finalize`]) looks the same way before each step that reads
//! or writes a whole table (`VALIDATE CONSTRAINT`, whose scan may log every page it sets
//! hint bits on, and each `CREATE INDEX CONCURRENTLY`, which logs its whole index): a step
//! cannot be paused once begun, so a standby starts each at most the limit behind.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::cli::ReplicationArgs;
use crate::config::Config;
use crate::db::Db;
use crate::exit::{Exit, fail};
use crate::interrupt::Interrupt;
use crate::progress::Out;

/// The default limit. A standby without a slot can follow only while the primary keeps
/// the WAL it needs: from 11 on, what was written since the last checkpoint began, which
/// during the walk at PostgreSQL's default `max_wal_size` (1 GB) comes right after a
/// checkpoint to about `checkpoint_completion_target` x the WAL between checkpoints:
/// 0.9 x 539 MB (about 485 MB) from 14, 0.5 x 683 MB (about 340 MB) on 11-13; PostgreSQL
/// 10 keeps back to the checkpoint before (about 615 MB); worked out from PostgreSQL's
/// checkpoint arithmetic, not measured. 128 MB stays well inside all of them, and is
/// still a few seconds of the walk's WAL for a standby to catch up on.
pub const DEFAULT_MAX_LAG_MB: u64 = 128;

/// The default time a receiver the backfill waits for may store nothing.
pub const DEFAULT_STALL_SECS: u64 = 300;

/// How often the backfill looks while it goes on.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks while it waits.
const POLL: Duration = Duration::from_millis(500);
/// How often a wait says it is still waiting.
const SAY_EVERY: Duration = Duration::from_secs(30);

/// How the watch is set (`--max-replication-lag-mb`, `--replication-stall-secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Wait while a standby or subscriber is more than this far behind; 0 never waits.
    pub max_lag_mb: u64,
    /// End the run when the receiver waited for stores nothing for this long; zero: never.
    pub stall: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_lag_mb: DEFAULT_MAX_LAG_MB,
            stall: Duration::from_secs(DEFAULT_STALL_SECS),
        }
    }
}

impl Settings {
    /// The command line's, else the configuration file's limit, else the defaults.
    pub fn from_args(a: &ReplicationArgs, config: &Config) -> Settings {
        Settings {
            max_lag_mb: a
                .max_replication_lag_mb
                .or(config
                    .backfill
                    .as_ref()
                    .and_then(|b| b.max_replication_lag_mb))
                .unwrap_or(DEFAULT_MAX_LAG_MB),
            stall: Duration::from_secs(a.replication_stall_secs),
        }
    }
}

/// Who waits, as the watch's messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiter {
    Backfill,
    Finalize,
}

impl Waiter {
    fn name(self) -> &'static str {
        match self {
            Waiter::Backfill => "the backfill",
            Waiter::Finalize => "finalize",
        }
    }
}

/// A summary's note of the time waited for standbys: empty when there was no wait.
pub fn waited_text(seconds: f64) -> String {
    if seconds > 0.0 {
        format!("; waited {seconds:.1}s for standbys")
    } else {
        String::new()
    }
}

/// What `plan` names: both phases wait.
const BOTH: &str = "the backfill and finalize";

/// One walsender: its receiver's name and how far behind it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Behind {
    /// Its walsender; `None` for a slot whose receiver has gone for now (see
    /// [`LagWatch::wait`]).
    pub pid: Option<i32>,
    pub name: String,
    /// Who it is across reconnections: its slot, else its name and address.
    #[serde(skip)]
    pub key: String,
    #[serde(skip)]
    pub slot: Option<String>,
    pub bytes: i64,
    /// Up to where its receiver has confirmed (an LSN as a byte position).
    #[serde(skip)]
    pub stored: i64,
    /// A synchronous standby (`sync_state` sync or quorum).
    pub synchronous: bool,
}

impl Behind {
    fn describe(&self) -> String {
        let via = match (self.pid, &self.slot) {
            (Some(pid), _) => format!("walsender pid {pid}"),
            (None, Some(slot)) => format!("slot {slot}, no receiver connected right now"),
            (None, None) => "no receiver connected".to_owned(),
        };
        format!("{} ({via}) is {} behind", self.name, mb(self.bytes))
    }
}

fn mb(bytes: i64) -> String {
    format!("{:.0} MB", bytes as f64 / 1_048_576.0)
}

/// Every walsender and how far its receiver has confirmed: from `pg_stat_replication`
/// when the role may see it (superuser, `pg_read_all_stats`), else from the slot the
/// walsender streams from (any role may read `pg_replication_slots`; a physical slot's
/// `restart_lsn` follows its standby's flush position, a logical one's
/// `confirmed_flush_lsn` its subscriber's). A walsender with neither shows no position
/// (`hidden` when the role cannot see it; else a receiver that has not reported yet, or a
/// base backup).
const WALSENDERS: &str = "
    SELECT r.pid,
           coalesce(nullif(r.application_name, ''), s.slot_name::text, host(r.client_addr),
                    'a local receiver'),
           pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
           pg_wal_lsn_diff(coalesce(r.flush_lsn,
                                    CASE s.slot_type WHEN 'logical' THEN s.confirmed_flush_lsn
                                                     ELSE s.restart_lsn END),
                           '0/0')::bigint,
           r.state IS NULL AND s.slot_name IS NULL,
           coalesce(r.sync_state IN ('sync', 'quorum'), false),
           pg_size_bytes(current_setting('wal_segment_size')),
           s.slot_name::text,
           host(r.client_addr)
      FROM pg_stat_replication r
      LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid";

/// What one look at the walsenders found.
#[derive(Debug, Clone, Default)]
pub struct Walsenders {
    pub seen: Vec<Behind>,
    /// Walsenders this role cannot see into, with no slot to tell instead.
    pub hidden: usize,
    pub segment_bytes: i64,
}

pub fn walsenders(db: &mut Db) -> Result<Walsenders> {
    let rows = db
        .client()
        .query(WALSENDERS, &[])
        .context("reading pg_stat_replication and pg_replication_slots")?;
    let mut found = Walsenders::default();
    for r in rows {
        found.segment_bytes = r.get(6);
        if r.get::<_, bool>(4) {
            found.hidden += 1;
            continue;
        }
        // No position yet (a receiver starting, a base backup): nothing to wait for.
        if let Some(stored) = r.get::<_, Option<i64>>(3) {
            let current: i64 = r.get(2);
            let name: String = r.get(1);
            let slot: Option<String> = r.get(7);
            let key = match &slot {
                Some(slot) => format!("slot {slot}"),
                None => format!(
                    "{name}@{}",
                    r.get::<_, Option<String>>(8).unwrap_or_default()
                ),
            };
            found.seen.push(Behind {
                pid: Some(r.get(0)),
                name,
                key,
                slot,
                bytes: (current - stored).max(0),
                stored,
                synchronous: r.get(5),
            });
        }
    }
    Ok(found)
}

/// A slot whose receiver is not connected: how far behind it is.
const SLOT_POSITION: &str = "
    SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint,
           pg_wal_lsn_diff(CASE slot_type WHEN 'logical' THEN confirmed_flush_lsn
                                          ELSE restart_lsn END, '0/0')::bigint
      FROM pg_replication_slots
     WHERE slot_name = $1 AND NOT active";

/// `of`'s slot while its receiver is away (a subscriber restarting after a failed apply,
/// a standby reconnecting): as far behind as the slot keeps it.
fn left_behind(db: &mut Db, of: &Behind) -> Result<Option<Behind>> {
    let Some(slot) = &of.slot else {
        return Ok(None);
    };
    let row = db
        .client()
        .query_opt(SLOT_POSITION, &[slot])
        .context("reading pg_replication_slots")?;
    Ok(row.and_then(|r| {
        let (current, stored): (i64, Option<i64>) = (r.get(0), r.get(1));
        stored.map(|stored| Behind {
            pid: None,
            bytes: (current - stored).max(0),
            stored,
            ..of.clone()
        })
    }))
}

/// Slots with no receiver connected that keep WAL: name, bytes kept.
const IDLE_SLOTS: &str = "
    SELECT slot_name::text, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint
      FROM pg_replication_slots
     WHERE NOT active AND restart_lsn IS NOT NULL
     ORDER BY 2 DESC";

pub fn idle_slots(db: &mut Db) -> Result<Vec<(String, i64)>> {
    let rows = db
        .client()
        .query(IDLE_SLOTS, &[])
        .context("reading pg_replication_slots")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn idle_slots_text(slots: &[(String, i64)], who: &str) -> String {
    let named: Vec<String> = slots
        .iter()
        .map(|(name, kept)| format!("{name} ({} kept)", mb(*kept)))
        .collect();
    format!(
        "replication slot(s) with no receiver connected: {}; PostgreSQL keeps every WAL \
         segment such a slot has not confirmed, so the WAL we write will stay in pg_wal \
         until its receiver returns or the slot is dropped (pg_drop_replication_slot); \
         {who} does not wait for it",
        named.join(", ")
    )
}

fn hidden_text(hidden: usize, who: &str) -> String {
    format!(
        "{hidden} walsender(s) stream from this server with no replication slot, and this \
         role cannot see how far behind they are: GRANT pg_read_all_stats to it (as a \
         superuser), or {who} cannot wait for them"
    )
}

/// What `plan` says about replication before a backfill: who streams from this server,
/// how far behind each is, idle slots, and the limit the backfill and finalize will wait
/// at.
#[derive(Debug, Clone, Serialize)]
pub struct Outlook {
    pub receivers: Vec<Behind>,
    /// Walsenders this role cannot see into (no `pg_read_all_stats`, no slot).
    pub hidden: usize,
    /// Slots with no receiver connected, and the WAL each keeps.
    pub idle_slots: Vec<(String, i64)>,
    /// As configured; 0: never waits.
    pub limit_mb: u64,
    /// What the backfill and finalize wait at (at least two WAL segments); 0: never.
    pub limit_bytes: i64,
}

impl Outlook {
    pub fn read(db: &mut Db, limit_mb: u64) -> Result<Outlook> {
        let w = walsenders(db)?;
        let limit_bytes = if limit_mb == 0 {
            0
        } else {
            limit_bytes(limit_mb, w.segment_bytes)
        };
        Ok(Outlook {
            receivers: w.seen,
            hidden: w.hidden,
            idle_slots: idle_slots(db)?,
            limit_mb,
            limit_bytes,
        })
    }

    /// Lines for `plan`, none when nothing streams from this server and no slot waits.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.receivers.is_empty() {
            let each: Vec<String> = self
                .receivers
                .iter()
                .map(|b| {
                    let sync = if b.synchronous { ", synchronous" } else { "" };
                    format!("{}{sync}", b.describe())
                })
                .collect();
            let wait = if self.limit_mb == 0 {
                format!("{BOTH} will not wait for them (max_replication_lag_mb 0)")
            } else {
                format!(
                    "{BOTH} wait whenever one is more than {} behind",
                    mb(self.limit_bytes)
                )
            };
            lines.push(format!("replication: {}; {wait}", each.join("; ")));
        }
        if self.hidden > 0 && self.limit_mb > 0 {
            lines.push(format!("warning: {}", hidden_text(self.hidden, BOTH)));
        }
        if !self.idle_slots.is_empty() {
            lines.push(format!(
                "warning: {}",
                idle_slots_text(&self.idle_slots, "hydra-upgrade")
            ));
        }
        lines
    }
}

/// The one furthest behind.
fn furthest(senders: Vec<Behind>) -> Option<Behind> {
    senders.into_iter().max_by_key(|b| b.bytes)
}

/// The limit in bytes for `max_lag_mb`, at least two WAL segments: `pg_receivewal`
/// without `--synchronous` confirms only whole segments, so it shows up to one segment
/// behind even when it has everything.
fn limit_bytes(max_lag_mb: u64, segment_bytes: i64) -> i64 {
    i64::try_from(max_lag_mb)
        .map_or(i64::MAX, |m| m.saturating_mul(1_048_576))
        .max(segment_bytes.saturating_mul(2))
}

/// The watch on replication of a backfill or final phase, one for the whole run.
#[derive(Debug)]
pub struct LagWatch {
    who: Waiter,
    /// `None`: never wait.
    max_lag_mb: Option<u64>,
    /// In bytes, as of the last look (it depends on the segment size).
    limit: i64,
    /// `None`: wait however long it takes.
    stall: Option<Duration>,
    /// The receiver last waited for, how far it had stored and since when: kept across
    /// waits and reconnections, so that one that keeps reconnecting without storing
    /// anything still runs into the stall time.
    storing: Option<(String, i64, Instant)>,
    last_look: Option<Instant>,
    told: bool,
    /// Time spent waiting.
    pub waited: Duration,
}

impl LagWatch {
    /// `max_lag_mb` 0: never wait; `stall` zero: wait however long it takes.
    pub fn new(settings: Settings, who: Waiter) -> LagWatch {
        let Settings { max_lag_mb, stall } = settings;
        LagWatch {
            who,
            max_lag_mb: (max_lag_mb > 0).then_some(max_lag_mb),
            limit: limit_bytes(max_lag_mb, 0),
            stall: (!stall.is_zero()).then_some(stall),
            storing: None,
            last_look: None,
            told: false,
            waited: Duration::ZERO,
        }
    }

    /// Look (at most once a second): the walsender more than the limit behind, if one is.
    /// The caller saves its progress and then calls [`LagWatch::wait`].
    pub fn behind(&mut self, db: &mut Db, table: &str, out: &Out) -> Result<Option<Behind>> {
        let Some(max_lag_mb) = self.max_lag_mb else {
            return Ok(None);
        };
        if self.last_look.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return Ok(None);
        }
        self.last_look = Some(Instant::now());
        let w = walsenders(db)?;
        let limit = limit_bytes(max_lag_mb, w.segment_bytes);
        self.limit = limit;
        if !self.told {
            self.told = true;
            self.tell(db, table, &w, limit, out)?;
        }
        Ok(furthest(w.seen).filter(|b| b.bytes > limit))
    }

    /// [`LagWatch::behind`] without its once-a-second limit: before a step that cannot be
    /// paused once begun (finalize's), however soon after the last look.
    pub fn behind_now(&mut self, db: &mut Db, table: &str, out: &Out) -> Result<Option<Behind>> {
        self.last_look = None;
        self.behind(db, table, out)
    }

    /// Once a run: who streams, who cannot be seen, which slots keep WAL for nobody.
    fn tell(&self, db: &mut Db, table: &str, w: &Walsenders, limit: i64, out: &Out) -> Result<()> {
        if !w.seen.is_empty() {
            let names: Vec<&str> = w.seen.iter().map(|b| b.name.as_str()).collect();
            out.event(
                "replication",
                &format!(
                    "{table}: streaming to {}; {} waits whenever one is more than {} behind \
                     (--max-replication-lag-mb)",
                    names.join(", "),
                    self.who.name(),
                    mb(limit)
                ),
                json!({"table": table, "receivers": names, "limit_bytes": limit}),
            );
        }
        if w.hidden > 0 {
            out.warn(&format!(
                "{table}: {}",
                hidden_text(w.hidden, self.who.name())
            ));
        }
        let idle = idle_slots(db)?;
        if !idle.is_empty() {
            out.warn(&format!(
                "{table}: {}",
                idle_slots_text(&idle, self.who.name())
            ));
        }
        Ok(())
    }

    /// Wait until every walsender is within half the limit (or gone). Ends on Ctrl-C, and
    /// with exit 17 when the one waited for stores nothing for the stall time.
    pub fn wait(
        &mut self,
        db: &mut Db,
        table: &str,
        first: Behind,
        out: &Out,
        interrupt: &Interrupt,
        resume_hint: &str,
    ) -> Result<()> {
        let start = Instant::now();
        let result = self.wait_for(db, table, first, out, interrupt, resume_hint);
        self.waited += start.elapsed();
        self.last_look = Some(Instant::now());
        result
    }

    fn wait_for(
        &mut self,
        db: &mut Db,
        table: &str,
        first: Behind,
        out: &Out,
        interrupt: &Interrupt,
        resume_hint: &str,
    ) -> Result<()> {
        let start = Instant::now();
        let mut limit = self.limit;
        let say = |kind: &str, message: String, b: &Behind, limit: i64| {
            out.event(
                kind,
                &message,
                json!({"table": table, "receiver": b.name, "pid": b.pid, "behind_bytes": b.bytes,
                       "limit_bytes": limit, "waited_seconds": start.elapsed().as_secs_f64()}),
            )
        };
        say(
            "replication-wait",
            format!(
                "{table}: waiting: {}; {} goes on once it is within {}",
                first.describe(),
                self.who.name(),
                mb(limit / 2)
            ),
            &first,
            limit,
        );
        let mut said = start;
        let mut last = first;
        self.check_storing(table, &last)?;
        loop {
            if interrupt.sleep(POLL) {
                interrupt.check(resume_hint)?;
            }
            let w = walsenders(db)?;
            limit = limit_bytes(self.max_lag_mb.unwrap_or(0), w.segment_bytes);
            let mut now = furthest(w.seen);
            // Its receiver away for now (no walsender of its own): its slot still keeps it
            // behind, and it will be back.
            if now.as_ref().is_none_or(|b| b.key != last.key)
                && let Some(away) = left_behind(db, &last)?
                && now.as_ref().is_none_or(|b| away.bytes > b.bytes)
            {
                now = Some(away);
            }
            match now {
                Some(b) if b.bytes > limit / 2 => {
                    self.check_storing(table, &b)?;
                    if said.elapsed() >= SAY_EVERY {
                        said = Instant::now();
                        let message = format!(
                            "{table}: still waiting after {:.0} s: {}",
                            start.elapsed().as_secs_f64(),
                            b.describe()
                        );
                        say("replication-wait", message, &b, limit);
                    }
                    last = b;
                }
                _ => {
                    let how = match &now {
                        Some(b) => {
                            // Caught up: a later wait starts its stall time afresh.
                            self.storing = None;
                            b.describe()
                        }
                        None => format!("{} is gone", last.name),
                    };
                    let message = format!(
                        "{table}: going on after {:.1} s: {how}",
                        start.elapsed().as_secs_f64()
                    );
                    say(
                        "replication-caught-up",
                        message,
                        now.as_ref().unwrap_or(&last),
                        limit,
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Note how far `b` has stored; fail with exit 17 when the receiver waited for has
    /// stored nothing for the stall time, whichever walsender it came through.
    fn check_storing(&mut self, table: &str, b: &Behind) -> Result<()> {
        let since = match &mut self.storing {
            Some((key, stored, since)) if *key == b.key => {
                if b.stored > *stored {
                    (*stored, *since) = (b.stored, Instant::now());
                }
                *since
            }
            _ => {
                self.storing = Some((b.key.clone(), b.stored, Instant::now()));
                return Ok(());
            }
        };
        match self.stall {
            Some(stall) if since.elapsed() >= stall => Err(fail(
                Exit::ReplicationStalled,
                format!(
                    "{table}: {} and has stored no WAL for {} s; {} stopped (all committed \
                     work is kept). See to it (its server log; on a logical subscriber \
                     pg_stat_subscription), or drop its slot if it is gone for good, then run \
                     the same command again; --max-replication-lag-mb 0 does not wait for \
                     any standby (a slot then keeps the WAL we write in pg_wal)",
                    b.describe(),
                    stall.as_secs(),
                    self.who.name()
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(max_lag_mb: u64, stall: Duration) -> LagWatch {
        LagWatch::new(Settings { max_lag_mb, stall }, Waiter::Backfill)
    }

    fn standby(pid: i32, bytes: i64) -> Behind {
        Behind {
            pid: Some(pid),
            name: format!("s{pid}"),
            key: format!("s{pid}@"),
            slot: None,
            bytes,
            stored: 0,
            synchronous: false,
        }
    }

    #[test]
    fn the_limit_is_at_least_two_segments() {
        assert_eq!(limit_bytes(128, 16 << 20), 128 << 20);
        assert_eq!(limit_bytes(1, 16 << 20), 32 << 20);
        assert_eq!(limit_bytes(u64::MAX, 16 << 20), i64::MAX);
        assert_eq!(watch(0, Duration::ZERO).max_lag_mb, None);
    }

    #[test]
    fn a_receiver_that_stores_nothing_stalls_whichever_walsender_it_comes_through() {
        let mut lag = watch(1, Duration::from_millis(50));
        let mut b = standby(1, 100 << 20);
        b.key = "slot s".into();
        assert!(lag.check_storing("builds", &b).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        // Reconnected: another walsender, the same slot, nothing more stored.
        b.pid = Some(2);
        let e = lag.check_storing("builds", &b).unwrap_err();
        assert_eq!(crate::exit::exit_of(&e), Exit::ReplicationStalled);
        assert!(
            format!("{e:#}").contains("has stored no WAL for 0 s"),
            "{e:#}"
        );
        // Storing again starts the time afresh.
        b.stored += 1;
        assert!(lag.check_storing("builds", &b).is_ok());
        // Zero: wait however long it takes.
        let mut never = watch(1, Duration::ZERO);
        assert!(never.check_storing("builds", &b).is_ok());
        std::thread::sleep(Duration::from_millis(10));
        assert!(never.check_storing("builds", &b).is_ok());
    }

    #[test]
    fn the_furthest_behind_is_the_one_waited_for() {
        assert_eq!(furthest(vec![]), None);
        assert_eq!(
            furthest(vec![standby(1, 10), standby(2, 30), standby(3, 20)]),
            Some(standby(2, 30))
        );
    }

    #[test]
    fn plan_names_each_receiver_and_what_the_backfill_will_do() {
        let outlook = |receivers, hidden, idle_slots, limit_mb: u64| Outlook {
            receivers,
            hidden,
            idle_slots,
            limit_mb,
            limit_bytes: limit_bytes(limit_mb, 16 << 20),
        };
        assert!(outlook(vec![], 0, vec![], 128).lines().is_empty());
        let mut sync = standby(7, 3 << 20);
        sync.synchronous = true;
        assert_eq!(
            outlook(vec![sync], 0, vec![], 128).lines(),
            [
                "replication: s7 (walsender pid 7) is 3 MB behind, synchronous; the backfill \
              and finalize wait whenever one is more than 128 MB behind"
            ]
        );
        let lines = outlook(vec![standby(8, 0)], 2, vec![("gone".into(), 5 << 20)], 0).lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].ends_with("will not wait for them (max_replication_lag_mb 0)"),
            "{lines:?}"
        );
        // Not waiting for any: no advice on how to let it wait.
        assert!(!lines.iter().any(|l| l.contains("GRANT")), "{lines:?}");
        assert!(lines[1].contains("gone (5 MB kept)"), "{lines:?}");
        let hidden = outlook(vec![], 1, vec![], 128).lines();
        assert!(hidden[0].contains("GRANT pg_read_all_stats"), "{hidden:?}");
    }
}
