//! Standbys and logical subscribers that fall behind the backfill.
//!
//! The walk writes WAL as fast as one server process can (a 10M-build walk about 7.7 GB
//! in six minutes, BENCHMARKS.md), far faster than Hydra does. A standby that cannot keep
//! up does harm on the primary: with a replication slot, PostgreSQL keeps every WAL
//! segment the standby has not confirmed, and `pg_wal` grows until the disk is full (the
//! server then stops, Hydra with it); without a slot, a standby that falls behind past what
//! `pg_wal` keeps can no longer follow and has to be cloned again; with synchronous
//! replication, every Hydra commit waits for the standby to store our WAL before its own.
//!
//! So between transactions the backfill looks, at most once a second, at how much WAL each
//! connected walsender (`pg_stat_replication`: a streaming standby, a logical subscriber)
//! has sent that its receiver has not yet flushed, and while one is more than the limit
//! behind it waits, holding no lock and no transaction, until that one is within half the
//! limit. A standby that disconnects is no longer waited for; an inactive slot (no receiver
//! connected) is not waited for either, as waiting would not bring it closer.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::db::Db;
use crate::interrupt::Interrupt;
use crate::progress::Out;

/// The default limit: a standby this far behind has a few seconds of the walk's WAL to
/// catch up on, and `pg_wal` at PostgreSQL's default `max_wal_size` (1 GB) still holds
/// what it has not received.
pub const DEFAULT_MAX_LAG_MB: u64 = 512;

/// How often the backfill looks while it goes on.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// How often it looks while it waits.
const POLL: Duration = Duration::from_millis(500);
/// How often a wait says it is still waiting.
const SAY_EVERY: Duration = Duration::from_secs(30);

/// One walsender: its receiver's name and how far behind it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Behind {
    pub pid: i32,
    pub name: String,
    pub bytes: i64,
}

impl Behind {
    fn describe(&self) -> String {
        format!(
            "{} (walsender pid {}) is {} behind",
            self.name,
            self.pid,
            mb(self.bytes)
        )
    }
}

fn mb(bytes: i64) -> String {
    format!("{:.0} MB", bytes as f64 / 1_048_576.0)
}

/// Every walsender the role can see into, and how many it cannot (without
/// `pg_read_all_stats` a role sees a walsender's pid only).
const WALSENDERS: &str = "
    SELECT pid,
           coalesce(nullif(application_name, ''), host(client_addr), 'a local receiver'),
           state IS NULL,
           pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint
      FROM pg_stat_replication";

/// The walsenders and how many are hidden from this role.
pub fn walsenders(db: &mut Db) -> Result<(Vec<Behind>, usize)> {
    let rows = db
        .client()
        .query(WALSENDERS, &[])
        .context("reading pg_stat_replication")?;
    let mut seen = Vec::new();
    let mut hidden = 0;
    for r in rows {
        if r.get::<_, bool>(2) {
            hidden += 1;
            continue;
        }
        // No flush position yet (a receiver starting, a base backup): nothing to wait for.
        if let Some(bytes) = r.get::<_, Option<i64>>(3) {
            seen.push(Behind {
                pid: r.get(0),
                name: r.get(1),
                bytes,
            });
        }
    }
    Ok((seen, hidden))
}

/// What `plan` says about replication before a backfill: who streams from this server,
/// how far behind each is, and the limit the backfill will wait at.
#[derive(Debug, Clone, Serialize)]
pub struct Outlook {
    pub receivers: Vec<Behind>,
    /// Walsenders this role cannot see into (it lacks `pg_read_all_stats`).
    pub hidden: usize,
    /// 0: the backfill never waits.
    pub limit_mb: u64,
}

impl Outlook {
    pub fn read(db: &mut Db, limit_mb: u64) -> Result<Outlook> {
        let (receivers, hidden) = walsenders(db)?;
        Ok(Outlook {
            receivers,
            hidden,
            limit_mb,
        })
    }

    /// One line, or none when nothing streams from this server.
    pub fn summary(&self) -> Option<String> {
        if self.receivers.is_empty() && self.hidden == 0 {
            return None;
        }
        let mut parts: Vec<String> = self.receivers.iter().map(Behind::describe).collect();
        if self.hidden > 0 {
            parts.push(format!(
                "{} walsender(s) this role cannot see into (GRANT pg_read_all_stats to \
                 it, or the backfill cannot wait for them)",
                self.hidden
            ));
        }
        let wait = if self.limit_mb == 0 {
            "the backfill will not wait for them (max_replication_lag_mb 0)".to_owned()
        } else {
            format!(
                "the backfill waits whenever one is more than {} MB behind",
                self.limit_mb
            )
        };
        Some(format!("{}; {wait}", parts.join("; ")))
    }
}

/// The one furthest behind.
fn furthest(senders: Vec<Behind>) -> Option<Behind> {
    senders.into_iter().max_by_key(|b| b.bytes)
}

/// The backfill's watch on replication, one per table.
#[derive(Debug)]
pub struct LagWatch {
    /// In bytes; `None`: never wait.
    limit: Option<i64>,
    last_look: Option<Instant>,
    told_hidden: bool,
    told_connected: bool,
    /// Time spent waiting.
    pub waited: Duration,
}

impl LagWatch {
    /// `max_lag_mb` 0: never wait.
    pub fn new(max_lag_mb: u64) -> LagWatch {
        let limit = (max_lag_mb > 0)
            .then(|| i64::try_from(max_lag_mb).map_or(i64::MAX, |m| m.saturating_mul(1_048_576)));
        LagWatch {
            limit,
            last_look: None,
            told_hidden: false,
            told_connected: false,
            waited: Duration::ZERO,
        }
    }

    /// Look (at most once a second): the walsender more than the limit behind, if one is.
    /// The caller saves its progress and then calls [`LagWatch::wait`].
    pub fn behind(&mut self, db: &mut Db, table: &str, out: &Out) -> Result<Option<Behind>> {
        let Some(limit) = self.limit else {
            return Ok(None);
        };
        if self.last_look.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return Ok(None);
        }
        self.last_look = Some(Instant::now());
        let (senders, hidden) = walsenders(db)?;
        if hidden > 0 && !self.told_hidden {
            self.told_hidden = true;
            out.warn(&format!(
                "{table}: {hidden} standby or subscriber connection(s) are streaming from this \
                 server, but this role cannot see how far behind they are, so the backfill \
                 cannot wait for them to keep up; GRANT pg_read_all_stats TO the role it \
                 connects as (or pass --max-replication-lag-mb 0 to say it need not)"
            ));
        }
        if !senders.is_empty() && !self.told_connected {
            self.told_connected = true;
            let names: Vec<&str> = senders.iter().map(|b| b.name.as_str()).collect();
            out.event(
                "replication",
                &format!(
                    "{table}: streaming to {}; the backfill waits whenever one is more than \
                     {} behind (--max-replication-lag-mb)",
                    names.join(", "),
                    mb(limit)
                ),
                json!({"table": table, "receivers": names, "limit_bytes": limit}),
            );
        }
        Ok(furthest(senders).filter(|b| b.bytes > limit))
    }

    /// Wait until every walsender is within half the limit (or gone). Ends on Ctrl-C.
    pub fn wait(
        &mut self,
        db: &mut Db,
        table: &str,
        first: Behind,
        out: &Out,
        interrupt: &Interrupt,
        resume_hint: &str,
    ) -> Result<()> {
        let limit = self.limit.unwrap_or(0);
        let resume_below = limit / 2;
        let start = Instant::now();
        let mut said = start;
        let say = |kind: &str, message: String, b: &Behind| {
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
                "{table}: waiting: {} (limit {}); the backfill goes on once it is within {}",
                first.describe(),
                mb(limit),
                mb(resume_below)
            ),
            &first,
        );
        let mut last = first;
        loop {
            if interrupt.sleep(POLL) {
                self.waited += start.elapsed();
                interrupt.check(resume_hint)?;
            }
            let now = furthest(walsenders(db)?.0);
            match now {
                Some(b) if b.bytes > resume_below => {
                    if said.elapsed() >= SAY_EVERY {
                        said = Instant::now();
                        let message = format!(
                            "{table}: still waiting after {:.0} s: {}",
                            start.elapsed().as_secs_f64(),
                            b.describe()
                        );
                        say("replication-wait", message, &b);
                    }
                    last = b;
                }
                _ => {
                    let how = now
                        .as_ref()
                        .map_or_else(|| format!("{} is gone", last.name), Behind::describe);
                    let message = format!(
                        "{table}: going on after {:.1} s: {how}",
                        start.elapsed().as_secs_f64()
                    );
                    say(
                        "replication-caught-up",
                        message,
                        now.as_ref().unwrap_or(&last),
                    );
                    self.waited += start.elapsed();
                    self.last_look = Some(Instant::now());
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_never_waits_and_megabytes_are_bytes() {
        assert_eq!(LagWatch::new(0).limit, None);
        assert_eq!(LagWatch::new(512).limit, Some(512 * 1_048_576));
        assert_eq!(LagWatch::new(u64::MAX).limit, Some(i64::MAX));
    }

    #[test]
    fn the_furthest_behind_is_the_one_waited_for() {
        let b = |pid, bytes| Behind {
            pid,
            name: format!("s{pid}"),
            bytes,
        };
        assert_eq!(furthest(vec![]), None);
        assert_eq!(furthest(vec![b(1, 10), b(2, 30), b(3, 20)]), Some(b(2, 30)));
    }
}
