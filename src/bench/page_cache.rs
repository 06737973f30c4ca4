//! `--warm-copy`: before a writer run, the copy in the OS page cache and the template out
//! of it.
//!
//! At 10M builds the bench's cluster holds the template (6.9 GB) and the run's copy of it
//! (6.9 GB), and `wal prepare` then adds 8.6 GB of WAL segments: more than this machine's
//! page cache keeps beside everything else, so parts of the copy may be read from the
//! disk during the run, by our walk and by the writer, next to the WAL's syncs. A Hydra's
//! server has one database, and one with enough memory keeps it cached. This drops the
//! clean pages of the page cache (`/proc/sys/vm/drop_caches`, as root; the copy's were
//! made clean by the bench's `CHECKPOINT` after `CREATE DATABASE`, the template's were
//! never dirty) and reads every relation of the copy back in with `pg_prewarm(..., 'read')`,
//! which goes through the OS cache and leaves PostgreSQL's own buffers alone.
//!
//! Measured at 10M (BENCHMARKS.md, "The copy in the page cache"): warmed so, the writer's
//! p99 during our walk was about twice as high, not lower; a diagnostic, off by default.
//! Why ("Where the CPU time goes during the walk"): the read-back leaves the copy in the
//! kernel's large page-cache folios, and PostgreSQL's 8 kB writes into those cost the
//! kernel (`ext4_block_write_begin`, ext4's writeback) far more CPU.

use std::time::Instant;

use anyhow::{Context, Result};

use super::proc_stat;
use crate::db::Db;

/// What warming read.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Warmed {
    pub mb: f64,
    pub seconds: f64,
    /// The machine's file pages in the page cache held in huge (PMD-sized, 2 MB on
    /// x86-64) folios right after the read-back (`/proc/meminfo`'s `FileHugePages`), the
    /// copy's among them: the large folios PostgreSQL's 8 kB writes then go into
    /// (smaller large folios are not counted anywhere in `/proc/meminfo`).
    pub huge_mb: f64,
}

/// Drop the page cache's clean pages, then read the copy `db` is connected to into it.
pub fn warm(db: &mut Db) -> Result<Warmed> {
    let started = Instant::now();
    std::fs::write("/proc/sys/vm/drop_caches", "1").context(
        "--warm-copy: writing 1 to /proc/sys/vm/drop_caches (needs root, and a kernel that \
         lets this machine drop its page cache)",
    )?;
    db.client()
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        .context("--warm-copy needs the pg_prewarm extension (PostgreSQL's contrib)")?;
    let bytes: i64 = db
        .client()
        .query_one(
            "SELECT coalesce(sum(pg_prewarm(c.oid, 'read')), 0)::bigint
                    * current_setting('block_size')::bigint
               FROM pg_class c
              WHERE c.relkind IN ('r', 'i', 't', 'm') AND c.relpersistence = 'p'",
            &[],
        )?
        .get(0);
    let seconds = started.elapsed().as_secs_f64();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Ok(Warmed {
        mb: bytes as f64 / 1_048_576.0,
        seconds,
        huge_mb: proc_stat::meminfo_kb(&meminfo, "FileHugePages").unwrap_or(0) as f64 / 1024.0,
    })
}
