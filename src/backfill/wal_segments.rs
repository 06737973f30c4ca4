//! Whether PostgreSQL has WAL segments ready for the WAL our walk writes.
//!
//! A walk writes about as much WAL as the table and its indexes take (each page's first
//! change after a checkpoint is logged whole: 794 MB of WAL for 743 MB of Builds at 1M
//! builds, BENCHMARKS.md). PostgreSQL writes WAL into 16 MB segment files that it recycles
//! at checkpoints; when none is ready, it creates the next one while it holds the WAL
//! write lock, and with `wal_init_zero = on` (the default) it first fills the file with
//! zeros and syncs it. Every commit of Hydra's that needs its WAL flushed meanwhile waits:
//! in the benchmark with no segment ready (`wal_recycle = off`) Hydra's writes waited about
//! 15 ms twice a second during the backfill, a p99 of 9 x its idle one (BENCHMARKS.md,
//! "WAL segments"). A Hydra that writes little WAL between checkpoints keeps few segments
//! (`min_wal_size`, 80 MB by default), so a backfill creates nearly all of its segments
//! until a checkpoint recycles what it wrote; at the default `max_wal_size` the first is
//! requested after about 540 MB of WAL, so a million builds' backfill ran its whole walk
//! so (10.3 x, BENCHMARKS.md, "A quiet Hydra's `pg_wal`").
//!
//! It also says when the walk alone writes enough WAL for PostgreSQL to request a
//! checkpoint during it, whose writes hold Hydra's commits up too (3.0 x at 1M with
//! segments ready). The check only tells the admin; it changes no setting.
//! `hydra-upgrade wal prepare` (src/wal_prepare.rs) does, for a superuser. Looking into
//! `pg_wal` needs superuser or `pg_monitor`; without it the check says it could not look.

use anyhow::Result;
use postgres::error::SqlState;
use serde_json::{Value, json};

use super::Table;
use super::state::{PHASE_KEYS, PHASE_PAGES, TableProgress};
use crate::db::Db;
use crate::progress::Out;

/// What `pg_wal` holds ahead of the WAL insert position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub segment_bytes: i64,
    /// Bytes left in the segment being written.
    pub rest_of_current: i64,
    /// Whole segments named after the current one: recycled or preallocated.
    pub segments_ahead: i64,
    /// `wal_init_zero` (PostgreSQL 12+; older servers always zero-fill).
    pub zero_filled: bool,
}

impl Ready {
    pub fn bytes(&self) -> i64 {
        self.rest_of_current + self.segments_ahead * self.segment_bytes
    }

    /// How many segments PostgreSQL would create for `expected` bytes of WAL if no
    /// checkpoint recycled any meanwhile.
    pub fn to_create(&self, expected: i64) -> i64 {
        let short = expected - self.bytes();
        if short <= 0 || self.segment_bytes <= 0 {
            0
        } else {
            (short + self.segment_bytes - 1) / self.segment_bytes
        }
    }
}

/// From this many new segments on, the walk is warned about: fewer are a few short waits
/// of Hydra's commits (15 ms each on the benchmark's disk); 8 of 16 MB are 128 MB of WAL,
/// about 4 s of a backfill's walk there.
pub const MANY_NEW_SEGMENTS: i64 = 8;

const READY: &str = "
    SELECT pg_size_bytes(current_setting('wal_segment_size')),
           (pg_walfile_name_offset(pg_current_wal_insert_lsn())).file_offset::bigint,
           (SELECT count(*) FROM pg_ls_waldir() w
             WHERE w.name ~ '^[0-9A-F]{24}$'
               AND w.name > pg_walfile_name(pg_current_wal_insert_lsn())),
           coalesce(current_setting('wal_init_zero', true), 'on') = 'on'";

/// `None` when this role may not look into `pg_wal`.
pub fn ready(db: &mut Db) -> Result<Option<Ready>> {
    let row = match db.client().query_one(READY, &[]) {
        Ok(row) => row,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => return Ok(None),
        Err(e) => {
            return Err(anyhow::Error::new(e).context("looking at the WAL segments in pg_wal"));
        }
    };
    let segment_bytes: i64 = row.get(0);
    let offset: i64 = row.get(1);
    Ok(Some(Ready {
        segment_bytes,
        rest_of_current: segment_bytes - offset,
        segments_ahead: row.get(2),
        zero_filled: row.get(3),
    }))
}

/// PostgreSQL requests a checkpoint once the WAL since the last one passes `max_wal_size /
/// (1 + checkpoint_completion_target)` (before 11, `/ (2 + ...)`); every setting here is
/// readable by any role.
const CHECKPOINT_DIVISOR: &str = "
    SELECT (CASE WHEN current_setting('server_version_num')::int < 110000 THEN 2 ELSE 1 END)
           + current_setting('checkpoint_completion_target')::float8";

/// What `max_wal_size` is divided by to give the WAL after which a checkpoint is requested.
pub fn checkpoint_divisor(db: &mut Db) -> Result<f64> {
    Ok(db.client().query_one(CHECKPOINT_DIVISOR, &[])?.get(0))
}

/// What a walk of a table will ask of `pg_wal`.
#[derive(Debug, Clone, Copy)]
pub struct Outlook {
    pub table: Table,
    /// About how much WAL the walk will write.
    pub expected: i64,
    /// `None` when this role may not look into `pg_wal`.
    pub ready: Option<Ready>,
    /// WAL after which PostgreSQL requests a checkpoint (counted from the last one, so a
    /// checkpoint may come sooner).
    pub checkpoint_after: i64,
}

impl Outlook {
    pub fn summary(&self) -> String {
        let name = self.table.name();
        match &self.ready {
            Some(ready) => format!(
                "{name}: about {} MB of WAL to write, {} MB of WAL segments ready in pg_wal",
                mb(self.expected),
                mb(ready.bytes())
            ),
            None => format!(
                "{name}: about {} MB of WAL to write; how many WAL segments are ready is \
                 unknown: looking into pg_wal needs superuser or the pg_monitor role",
                mb(self.expected)
            ),
        }
    }

    /// Whether the walk alone writes enough WAL for a checkpoint to be requested during it.
    pub fn checkpoint_in_walk(&self) -> bool {
        self.expected > self.checkpoint_after
    }

    /// What the admin should know when a checkpoint will fall inside the walk: its writes
    /// hold Hydra's commits up as well.
    fn checkpoint_warning(&self) -> Option<String> {
        self.checkpoint_in_walk().then(|| {
            format!(
                "{}: a checkpoint will be requested during the walk: PostgreSQL asks for one \
                 once the WAL since the last passes about {} MB (max_wal_size over 1 + \
                 checkpoint_completion_target), and the walk writes about {} MB. Hydra's \
                 commits wait behind its writes (at 1M builds in the benchmark the writer's \
                 p99 rose 3.0 x its idle one, against 1.7-2.0 x with none). A superuser can \
                 raise max_wal_size for the backfill: `hydra-upgrade wal prepare` (README, \
                 \"WAL segments\")",
                self.table.name(),
                mb(self.checkpoint_after),
                mb(self.expected)
            )
        })
    }

    /// What the admin should know when PostgreSQL will zero-fill many new segments.
    fn warning(&self) -> Option<String> {
        let ready = self.ready?;
        let to_create = ready.to_create(self.expected);
        (to_create >= MANY_NEW_SEGMENTS && ready.zero_filled).then(|| {
            format!(
                "{}: PostgreSQL will create up to {to_create} new WAL segments of {} MB while \
                 the walk runs, until checkpoints recycle enough of them; it fills each with \
                 zeros and syncs it while holding the WAL write lock, and Hydra's commits wait \
                 meanwhile (about 15 ms for a 16 MB segment on the benchmark's disk). A \
                 superuser can have PostgreSQL create and keep them before the backfill, one \
                 at a time, and keep checkpoints out of the walk: `hydra-upgrade wal \
                 prepare`; where pg_wal is on a copy-on-write filesystem (ZFS, btrfs), \
                 wal_init_zero = off and wal_recycle = off avoid most of it. See the README, \
                 \"WAL segments\"",
                self.table.name(),
                mb(ready.segment_bytes)
            )
        })
    }

    /// Every warning of this outlook, for `backfill` and `plan` alike.
    pub fn warnings(&self) -> Vec<String> {
        [self.warning(), self.checkpoint_warning()]
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn data(&self) -> Value {
        let mut data = json!({
            "table": self.table.name(),
            "expected_bytes": self.expected,
            "ready_bytes": self.ready.map(|r| r.bytes()),
            "checkpoint_after_bytes": self.checkpoint_after,
            "checkpoint_in_walk": self.checkpoint_in_walk(),
        });
        if let Some(r) = &self.ready {
            data["segment_bytes"] = r.segment_bytes.into();
            data["segments_ahead"] = r.segments_ahead.into();
            data["segments_to_create"] = r.to_create(self.expected).into();
            data["zero_filled"] = r.zero_filled.into();
        }
        data
    }
}

/// The share of a table a walk still has to go through, from its saved progress (none:
/// all of it); a per-page walk's keys phase is its sweep for rows moved meanwhile, a few
/// pages' worth.
pub fn remaining(progress: Option<&TableProgress>) -> f64 {
    let Some(p) = progress else {
        return 1.0;
    };
    match (p.strategy.as_str(), p.phase.as_str()) {
        (_, PHASE_PAGES) | ("keyset", PHASE_KEYS) if p.total > 0 => {
            (1.0 - p.position as f64 / p.total as f64).clamp(0.0, 1.0)
        }
        (_, PHASE_PAGES) | ("keyset", PHASE_KEYS) => 1.0,
        _ => 0.0,
    }
}

/// What walking the `remaining` share of `table` will ask of `pg_wal`.
pub fn outlook(db: &mut Db, table: Table, remaining: f64) -> Result<Outlook> {
    let size: i64 = db
        .client()
        .query_one(
            "SELECT pg_total_relation_size(to_regclass($1))",
            &[&table.name()],
        )?
        .get(0);
    let max_wal_size: i64 = db
        .client()
        .query_one("SELECT pg_size_bytes(current_setting('max_wal_size'))", &[])?
        .get(0);
    let checkpoint_after = (max_wal_size as f64 / checkpoint_divisor(db)?) as i64;
    Ok(Outlook {
        table,
        expected: (size as f64 * remaining.clamp(0.0, 1.0)) as i64,
        ready: ready(db)?,
        checkpoint_after,
    })
}

/// Before a walk: say how much WAL is coming and how much room `pg_wal` has for it, and
/// warn when PostgreSQL will have to zero-fill many new segments while Hydra's commits
/// wait.
pub fn check(db: &mut Db, table: Table, remaining: f64, out: &Out) -> Result<()> {
    let o = outlook(db, table, remaining)?;
    out.event("wal_segments", &o.summary(), o.data());
    for w in o.warnings() {
        out.warn(&w);
    }
    Ok(())
}

fn mb(bytes: i64) -> i64 {
    bytes / (1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: i64 = 16 << 20;

    fn ready(rest: i64, ahead: i64) -> Ready {
        Ready {
            segment_bytes: SEG,
            rest_of_current: rest,
            segments_ahead: ahead,
            zero_filled: true,
        }
    }

    #[test]
    fn nothing_to_create_when_the_ready_segments_hold_the_wal() {
        assert_eq!(ready(SEG / 2, 4).to_create(4 * SEG), 0);
        assert_eq!(ready(SEG / 2, 4).to_create(4 * SEG + SEG / 2), 0);
        assert_eq!(ready(SEG, 0).to_create(0), 0);
    }

    #[test]
    fn one_segment_for_each_started_16_mb_beyond_them() {
        assert_eq!(ready(SEG / 2, 4).to_create(4 * SEG + SEG / 2 + 1), 1);
        assert_eq!(ready(SEG / 2, 4).to_create(6 * SEG + SEG / 2), 2);
        // A quiet Hydra's pg_wal (min_wal_size 80 MB) against 1M builds' 743 MB.
        assert_eq!(ready(SEG, 4).to_create(743 << 20), 42);
    }

    #[test]
    fn the_rest_of_a_walk_from_its_saved_progress() {
        let saved = |strategy: &str, phase: &str, position: i64, total: i64| {
            let mut p = TableProgress::new("builds", strategy, phase, total);
            p.position = position;
            p
        };
        assert_eq!(remaining(None), 1.0);
        assert_eq!(
            remaining(Some(&saved("per-page", PHASE_PAGES, 250, 1000))),
            0.75
        );
        assert_eq!(remaining(Some(&saved("per-page", PHASE_PAGES, 0, 0))), 1.0);
        // The sweep after a page walk, and a finished walk.
        assert_eq!(remaining(Some(&saved("per-page", PHASE_KEYS, 10, 0))), 0.0);
        assert_eq!(remaining(Some(&saved("per-page", "done", 1000, 1000))), 0.0);
        assert_eq!(
            remaining(Some(&saved("keyset", PHASE_KEYS, 500, 1000))),
            0.5
        );
        assert_eq!(remaining(Some(&saved("keyset", PHASE_KEYS, 0, 0))), 1.0);
    }
}
