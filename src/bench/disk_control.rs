//! `disk-control`: controls for the writer's figures. The Hydra-shaped writer runs alone,
//! then next to each of these in turn, with nothing else in PostgreSQL going on:
//! - a file: a thread overwrites a file next to the cluster's WAL at a given rate, 1 MB at
//!   a time, each followed by `fdatasync` (the WAL writer flushes about every MB:
//!   `wal_writer_flush_after`): the disk's answer to any sustained writing;
//! - one thread that keeps a CPU busy: how much one busy CPU of the two explains;
//! - WAL in bursts: a session writes the same rate of WAL and nothing else, as 1 MB
//!   messages (`pg_logical_emit_message`, not transactional, so not flushed by their
//!   writer: they reach the disk through the WAL writer or the next commit that needs
//!   them flushed), one statement each, with nothing written between them;
//! - streamed WAL: the same rate as a steady stream, as our backfill writes it: 8 kB
//!   messages (the size of a full-page image), 64 kB a statement, transactional,
//!   committed asynchronously every 1 MB;
//! - both: that stream and the busy thread at once, as our backfill's server process is
//!   on a CPU nearly all the time while it streams its WAL;
//! - memory: one thread that keeps a CPU busy updating one word in each 64-byte line of a
//!   buffer far larger than the CPU caches, as our walk goes through Builds' pages: what
//!   the busy thread, working in its registers, leaves out (caches emptied, memory
//!   bandwidth taken), alone and next to the WAL stream; kept, as our pinned pair is, on
//!   the CPU our backfill's `--pin-cpu auto` takes; and, with `--memory-rates`, the same
//!   thread held to given rates of memory traffic, busy in its registers in between, alone
//!   and next to the WAL stream;
//! - ours in another database: our per-page backfill of a copy of the template in another
//!   database of the same cluster: the same server work, WAL, buffer pool and disk as
//!   next to the writer, but none of the pages, rows or locks the writer touches.
//!
//! Together they separate what our backfill costs Hydra's writes by sharing the machine,
//! the WAL and the server from what it costs by sharing Hydra's tables.

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
/// The streamed WAL's message: a page, as a full-page image.
const STREAM_MESSAGE: usize = 8 << 10;
/// What one statement of the stream writes.
const STREAM_STATEMENT: usize = 64 << 10;
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
        Load::paced(mb_per_s, CHUNK, move |written| {
            self.file.write_all_at(&self.chunk, written % SPAN)?;
            self.file.sync_data()?;
            Ok(())
        })
    }
}

fn payload(bytes: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(bytes)
        .collect()
}

/// Write WAL and nothing else through `db` at `mb_per_s` until stopped, in 1 MB bursts.
pub fn wal_load(mut db: Db, mb_per_s: f64) -> Load {
    let payload = payload(CHUNK);
    Load::paced(mb_per_s, CHUNK, move |_| {
        db.client()
            .execute(
                "SELECT pg_logical_emit_message(false, 'hydra-upgrade-bench', $1::text)",
                &[&payload],
            )
            .context("writing WAL with pg_logical_emit_message")?;
        Ok(())
    })
}

/// Write WAL and nothing else through `db` at `mb_per_s` until stopped, as a stream of
/// 8 kB messages, eight to a statement (so the client and its server process stay
/// light on the CPUs: a round trip per 8 kB would make the control itself a CPU load),
/// in transactions of 1 MB. `db` should have `synchronous_commit` off, as our
/// backfill's session has: its commits wake the WAL writer and wait for no flush. The
/// transaction open when the load stops is rolled back with the session.
pub fn wal_stream_load(mut db: Db, mb_per_s: f64) -> Load {
    let payload = payload(STREAM_MESSAGE);
    let per_statement = STREAM_STATEMENT / STREAM_MESSAGE;
    let per_transaction = (CHUNK / STREAM_STATEMENT) as u64;
    Load::paced(mb_per_s, STREAM_STATEMENT, move |written| {
        let n = written / STREAM_STATEMENT as u64;
        let client = db.client();
        if n.is_multiple_of(per_transaction) {
            client.batch_execute("BEGIN")?;
        }
        client
            .execute(
                "SELECT count(pg_logical_emit_message(true, 'hydra-upgrade-bench', $1::text))
                   FROM generate_series(1, $2)",
                &[&payload, &(per_statement as i32)],
            )
            .context("writing WAL with pg_logical_emit_message")?;
        if n % per_transaction == per_transaction - 1 {
            client.batch_execute("COMMIT")?;
        }
        Ok(())
    })
}

/// A thread doing work until stopped, which reports its rate in MB/s: `chunk` bytes at a
/// time paced to a rate ([`Load::paced`]), or as fast as it goes ([`unpaced`]).
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<(u64, f64)>>,
}

impl Load {
    fn paced(
        mb_per_s: f64,
        chunk_bytes: usize,
        mut chunk: impl FnMut(u64) -> Result<()> + Send + 'static,
    ) -> Load {
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
                written += chunk_bytes as u64;
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
                x = spin(x, 10_000);
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

/// `rounds` steps of a random-number generator, in registers only: CPU time without memory
/// traffic.
fn spin(mut x: u64, rounds: u32) -> u64 {
    for _ in 0..rounds {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

/// Far larger than the caches of any CPU this runs on.
pub const MEMORY_LOAD_MIB: usize = 512;

/// The memory thread goes through its buffer this much at a time between looks at its
/// clock and its stop flag.
const MEMORY_CHUNK: usize = 64 << 10;

/// One thread updating a word in every 64-byte line of a `MEMORY_LOAD_MIB` buffer, round
/// and round, until stopped: a busy CPU that also empties the caches and takes memory
/// bandwidth. It keeps to the CPU our backfill's `--pin-cpu auto` would take (the one
/// serving the fewest device interrupts), so that it loads the machine as our pinned pair
/// does and leaves the other CPUs to the writer. Started once the buffer is allocated and
/// touched (the kernel's page faults are not part of the load); its rate is the bytes of
/// the lines it went through (each read and written back).
///
/// With `mb_per_s` it goes through memory at that rate only, and between its 64 kB chunks
/// it spins in its registers instead of sleeping: as busy a CPU as without a rate (as our
/// backfill's server process is on its CPU nearly all the time), with less memory traffic.
pub fn memory_load(mb_per_s: Option<f64>) -> Load {
    let (ready, wait) = std::sync::mpsc::channel();
    let load = unpaced(move |stop| {
        pin_to_the_quietest_cpu();
        let mut buf = vec![1u64; MEMORY_LOAD_MIB << 20 >> 3];
        let _ = ready.send(());
        let t0 = Instant::now();
        let mut bytes = 0u64;
        let mut x = 1u64;
        'load: loop {
            for chunk in buf.chunks_mut(MEMORY_CHUNK >> 3) {
                if stop.load(Ordering::Relaxed) {
                    break 'load;
                }
                for w in chunk.iter_mut().step_by(8) {
                    *w = std::hint::black_box(w.wrapping_add(1));
                }
                bytes += MEMORY_CHUNK as u64;
                if let Some(rate) = mb_per_s {
                    let due = Duration::from_secs_f64(bytes as f64 / (rate * 1_048_576.0));
                    while t0.elapsed() < due && !stop.load(Ordering::Relaxed) {
                        x = spin(x, 1_000);
                    }
                }
            }
        }
        std::hint::black_box(x);
        (bytes, t0.elapsed().as_secs_f64())
    });
    // An error here means the thread died; `stop` reports it.
    let _ = wait.recv();
    load
}

/// A thread running `work` as fast as it goes until its flag is set; `work` returns the
/// bytes it did and in how many seconds (its own clock, so that it can leave out its
/// preparation).
fn unpaced(work: impl FnOnce(&AtomicBool) -> (u64, f64) + Send + 'static) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || Ok(work(&flag)));
    Load { stop, handle }
}

/// The calling thread on the CPU `backfill --pin-cpu auto` would take, if it may; as it is
/// otherwise (a control still measures, only less like our pinned pair).
fn pin_to_the_quietest_cpu() {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    let Ok(allowed) = sched_getaffinity(Pid::from_raw(0)) else {
        return;
    };
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if cpus.len() < 2 {
        return;
    }
    let mut one = CpuSet::new();
    if one.set(crate::backfill::one_cpu::auto_cpu(&cpus)).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &one);
    }
}
