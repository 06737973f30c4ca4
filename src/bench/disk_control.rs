//! `disk-control`: controls for the writer's figures, with no backfill and nothing else in
//! PostgreSQL going on. The Hydra-shaped writer runs alone, then next to a plain file
//! writer: a thread overwrites a file next to the cluster's WAL at a given rate, 1 MB at a
//! time, each followed by `fdatasync` (the WAL writer flushes about every MB:
//! `wal_writer_flush_after`); then next to one thread that keeps a CPU busy; then next to
//! a session that writes the same rate of WAL and nothing else (1 MB messages with
//! `pg_logical_emit_message`, not transactional, so not flushed by their writer: like our
//! asynchronously committed backfill's WAL, they reach the disk through the WAL writer or
//! the next commit that needs them flushed). If the writer's p99 rose as much next to the
//! file as during our backfill, the rise would be the disk's answer to any sustained
//! writing; next to the busy thread, how much of it one busy CPU of the two explains;
//! next to the WAL, how much sharing the WAL stream does.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::mb;
use crate::db::Db;

const CHUNK: usize = 1 << 20;
/// The file is written once at full size, then overwritten in circles, as WAL segments
/// are preallocated and recycled.
const SPAN: u64 = 64 << 20;

/// The file, written and synced, before anything is measured. Its name is removed at
/// once; it is written through the open descriptor and freed when that closes.
pub struct FileLoad {
    file: File,
    chunk: Vec<u8>,
}

impl FileLoad {
    pub fn prepare(path: &Path) -> Result<FileLoad> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        // Random bytes, so that no layer below can compress or deduplicate them.
        let chunk: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
            .take(CHUNK)
            .collect();
        let mut offset = 0;
        while offset < SPAN {
            file.write_all_at(&chunk, offset)?;
            offset += CHUNK as u64;
        }
        file.sync_all()?;
        Ok(FileLoad { file, chunk })
    }

    /// Write at `mb_per_s` until stopped.
    pub fn start(self, mb_per_s: f64) -> Load {
        Load::paced(mb_per_s, move |written| {
            self.file.write_all_at(&self.chunk, written % SPAN)?;
            self.file.sync_data()?;
            Ok(())
        })
    }
}

/// Write WAL and nothing else through `db` at `mb_per_s` until stopped.
pub fn wal_load(mut db: Db, mb_per_s: f64) -> Load {
    let payload: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(CHUNK)
        .collect();
    Load::paced(mb_per_s, move |_| {
        db.client()
            .execute(
                "SELECT pg_logical_emit_message(false, 'hydra-upgrade-bench', $1::text)",
                &[&payload],
            )
            .context("writing WAL with pg_logical_emit_message")?;
        Ok(())
    })
}

/// A thread doing 1 MB of work at a time, paced to a rate in MB/s, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<(u64, f64)>>,
}

impl Load {
    fn paced(mb_per_s: f64, mut chunk: impl FnMut(u64) -> Result<()> + Send + 'static) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || -> Result<(u64, f64)> {
            let t0 = Instant::now();
            let mut written = 0u64;
            while !flag.load(Ordering::SeqCst) {
                let due = Duration::from_secs_f64(written as f64 / (mb_per_s * 1_048_576.0));
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait.min(Duration::from_millis(50)));
                    continue;
                }
                chunk(written)?;
                written += CHUNK as u64;
            }
            Ok((written, t0.elapsed().as_secs_f64()))
        });
        Load { stop, handle }
    }

    /// Stop; the rate reached, in MB/s.
    pub fn stop(self) -> Result<f64> {
        self.stop.store(true, Ordering::SeqCst);
        let (bytes, seconds) = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread of disk-control panicked"))??;
        Ok(mb(bytes as i64) / seconds.max(1e-9))
    }
}

/// One thread spinning on a CPU until stopped.
pub struct CpuLoad {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<u64>,
}

impl CpuLoad {
    pub fn start() -> CpuLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut x = 1u64;
            while !flag.load(Ordering::Relaxed) {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            x
        });
        CpuLoad { stop, handle }
    }

    pub fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the busy thread panicked"))?;
        Ok(())
    }
}
