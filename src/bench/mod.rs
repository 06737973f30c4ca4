//! The benchmark behind BENCHMARKS.md: one throwaway cluster, one synthetic Hydra at
//! schema 61 as a template, and per contender a fresh copy (`CREATE DATABASE ... TEMPLATE`)
//! so that every contender starts from the same bytes. Measured side by side in one run:
//!
//! 1. the backfill: one offline `UPDATE`, the stock `hydra-backfill-ids` algorithm
//!    ([`stock`]), ours per strategy through [`backfill::run`]: time, ratio to the offline
//!    UPDATE, HOT share of Builds updates, Builds table + index size before and after;
//! 2. the final phase (62..65): `hydra-init` applying the steps, and [`finalize::run`]:
//!    each step's lock time, and the worst latency a concurrent Hydra-shaped writer saw;
//! 3. the writer ([`workload`]) alone and during our backfill: p50/p99/max, errors, lost
//!    updates;
//! 4. the peak memory of the real `hydra-upgrade backfill` binary.
//!
//! Runs are repeated `--runs` times with the contender order reversed every other run;
//! every figure printed is the median over the runs (each column on its own).

pub mod cpu_census;
pub mod disk_control;
pub mod disk_stats;
pub mod disk_write_trace;
pub mod idle;
pub mod idle_group;
pub mod nice;
pub mod page_cache;
pub mod perf_profile;
pub mod pin;
pub mod proc_stat;
pub mod quiet_wal;
pub mod slice;
pub mod stock;
pub mod wal_trace;
pub mod wal_volume;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::backfill::{self, one_cpu::PinCpu};
use crate::cli::StrategyChoice;
use crate::db::Db;
use crate::exec::Cmd;
use crate::finalize;
use crate::hydra_schema;
use crate::interrupt::Interrupt;
use crate::pg_cluster::{PgCluster, SUPERUSER};
use crate::progress::{Mode, Out};
use crate::synth;
use crate::wal_prepare;
use crate::workload::{self, WriterSpec, WriterStats};

/// Server settings of the benchmark cluster: durable like production (fsync on,
/// synchronous_commit on), a realistic buffer pool, and max_wal_size large enough that
/// no checkpoint is forced by WAL volume in the middle of a contender.
pub const SETTINGS: &[&str] = &[
    "fsync=on",
    "synchronous_commit=on",
    "full_page_writes=on",
    "shared_buffers=256MB",
    "max_wal_size=20GB",
    "checkpoint_timeout=30min",
    "autovacuum=on",
];

const TEMPLATE: &str = "bench_t61";
const TEMPLATE_FILLED: &str = "bench_t61_filled";

pub const ALL_CONTENDERS: &[&str] = &[
    "offline",
    "stock",
    "per-page",
    "keyset",
    "final-stock",
    "final-ours",
    "writer",
    "disk-control",
    "memory",
];

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "bench",
    about = "Side-by-side benchmark of the jobset_id backfill and final phase (see BENCHMARKS.md)"
)]
pub struct BenchArgs {
    /// Builds rows of the synthetic Hydra.
    #[arg(long, default_value_t = 100_000)]
    pub builds: u64,
    #[arg(long, default_value_t = 150)]
    pub projects: u64,
    #[arg(long, default_value_t = 600)]
    pub jobsets: u64,
    #[arg(long, default_value_t = 18_000)]
    pub jobs: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Repeat everything this often; figures are medians, contender order alternates.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Leave out the writer workload (alone, during the backfill, during the final phase).
    #[arg(long)]
    pub skip_writer: bool,
    /// Which contenders to run (comma-separated): offline, stock, per-page, keyset,
    /// final-stock, final-ours, writer, disk-control, memory.
    #[arg(long, value_delimiter = ',', default_values_t = ALL_CONTENDERS.iter().map(|s| s.to_string()))]
    pub contenders: Vec<String>,
    /// How long the writer runs alone for its idle baseline (the writer contender). At
    /// 10 s (about 850 operations, the default before 30) the p99 is the ninth-slowest
    /// operation, and a few slow ones moved a 10M run's baseline from 1.6 to 4.4 ms.
    #[arg(long, default_value_t = 30)]
    pub writer_secs: u64,
    /// How long each of disk-control's phases runs (the writer alone, then next to each
    /// load).
    #[arg(long, default_value_t = 10)]
    pub control_secs: u64,
    /// The writer's pause between operations (Hydra writes tens of rows a second, not
    /// thousands).
    #[arg(long, default_value_t = 10)]
    pub writer_pause_ms: u64,
    /// Our backfill's target time per transaction (`hydra-upgrade backfill
    /// --target-batch-ms`), for every run of ours.
    #[arg(long, default_value_t = backfill::DEFAULT_TARGET_BATCH_MS)]
    pub target_batch_ms: u64,
    /// Our backfill's pause between transactions (`--pause-ms`).
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// Our backfill's largest batch (`--max-batch-size`, heap pages for per-page), by
    /// default the command line's.
    #[arg(long, value_name = "N")]
    pub max_batch_size: Option<u64>,
    /// An extra server setting `name=value` (repeatable; overrides the defaults), for
    /// experiments such as `autovacuum=off`.
    #[arg(long, value_name = "NAME=VALUE")]
    pub pg_setting: Vec<String>,
    /// A setting `name=value` for our backfill's session only (repeatable; `set_config`
    /// before the walk), for experiments with what a session may set itself, such as
    /// `backend_flush_after=32`.
    #[arg(long, value_name = "NAME=VALUE")]
    pub ours_setting: Vec<String>,
    /// While the writer runs during our backfill, sample the WAL insert and flush
    /// positions and the writer backend's wait event every 5 ms, and compare the writer's
    /// slow operations (over 2 x its idle p99) with the others: WAL written while they
    /// ran, WAL unflushed when they started, wait events (see `src/bench/wal_trace.rs`).
    /// In the final phase, name the wait events of the writer's slowest operations.
    #[arg(long)]
    pub wal_trace: bool,
    /// What our per-page backfill's WAL consists of: `pg_waldump --stats` over its range
    /// (see `src/bench/wal_volume.rs`; needs `pg_waldump` next to `postgres`).
    #[arg(long)]
    pub wal_stats: bool,
    /// Run our backfill's server process at this niceness, and its autogroup too where
    /// the kernel groups by session (see `src/bench/nice.rs`; raising it needs the
    /// cluster's user or root), to see whether Hydra's writes wait for a CPU.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nice_ours: Option<i32>,
    /// Run the cluster's WAL writer at this niceness while our backfill runs, and its
    /// autogroup too (see `src/bench/nice.rs`), back to 0 after (below 0 needs root):
    /// our asynchronous commits leave their WAL to it, and Hydra's commits wait for it
    /// when it holds the WAL write lock, to see whether its waits for a CPU reach
    /// Hydra's writes.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub nice_walwriter: Option<i32>,
    /// Keep the cluster's WAL writer on these CPUs (as `taskset -c` takes them, e.g. `1`)
    /// while our backfill runs, back on its own after (needs root or the cluster's
    /// user): with the backfill pinned to CPU 0, `1` keeps it off our CPU, `0` puts it on
    /// it.
    #[arg(long, value_name = "CPUS")]
    pub walwriter_cpus: Option<String>,
    /// Run our backfill's server process alone on the first CPU, every other process of
    /// the cluster and the bench (the writer's client) on the others (`taskset`; needs
    /// root or the cluster's user), to see whether Hydra's writes suffer from sharing
    /// CPUs with it (see `src/bench/pin.rs`).
    #[arg(long)]
    pub pin_ours: bool,
    /// Our backfill's `--pin-cpu` (`auto`, `off` or a CPU number); `--pin-ours` turns it
    /// off, as it places the processes itself.
    #[arg(long, value_name = "auto|off|CPU", default_value = "auto")]
    pub pin_cpu: PinCpu,
    /// Run our backfill's server process and its client (a bench thread) with this
    /// scheduler time slice (Linux 6.12 or later, 0.1-100 ms; needs root or the
    /// cluster's user), to see whether Hydra's woken processes wait behind them for the
    /// scheduler's tick (see `src/bench/slice.rs`).
    #[arg(long, value_name = "MS")]
    pub slice_ours: Option<f64>,
    /// How often the writer-with-backfill runs (and disk-control's "ours in another db")
    /// sample the other sessions holding the xmin horizon, in ms; 0: not at all. The
    /// sampler's session shares the CPUs with the writer there, and the writer's idle
    /// baseline has no sampler.
    #[arg(long, value_name = "MS", default_value_t = HORIZON_SAMPLE_MS)]
    pub writer_horizon_ms: u64,
    /// Run our backfill's server process and its client (a bench thread) under the
    /// `SCHED_IDLE` policy (`chrt --idle`; needs root or the cluster's user), to see
    /// whether Hydra's writes wait for a CPU behind our backfill (see
    /// `src/bench/idle.rs`).
    #[arg(long)]
    pub idle_ours: bool,
    /// Run our backfill's server process and its client (a bench thread) in a CPU control
    /// group of their own marked idle (`cpu.idle`; a cgroup v1 `cpu` hierarchy and root),
    /// which, unlike `--idle-ours`, is idle where it meets Hydra's processes' groups (see
    /// `src/bench/idle_group.rs`).
    #[arg(long)]
    pub idle_group_ours: bool,
    /// disk-control's rate, of its file and of its WAL session; by default the WAL rate
    /// of this run's per-page backfill next to the writer (else 50 MB/s).
    #[arg(long, value_name = "MB")]
    pub disk_mb_per_s: Option<f64>,
    /// disk-control's memory thread again at each of these rates (MB/s, comma-separated),
    /// busy in its registers between its chunks, alone and next to the WAL stream, after
    /// the rows where it goes as fast as it can: how much memory traffic next to a busy
    /// CPU it takes to slow the writer.
    #[arg(long, value_name = "MB,...", value_delimiter = ',')]
    pub memory_rates: Vec<f64>,
    /// Before each writer run, leave the copy's cluster with no more WAL segments ready
    /// than `min_wal_size` keeps, as a quiet Hydra has (see `src/bench/quiet_wal.rs`):
    /// our walk then creates most of its segments.
    #[arg(long)]
    pub quiet_wal: bool,
    /// Before each writer run (after `--quiet-wal`), `hydra-upgrade wal prepare` (the
    /// tool's own code, src/wal_prepare.rs: settings raised for the backfill, segments
    /// created one at a time, 100 ms apart), and `wal reset` after the run. (From
    /// `b833e5f` to `3b59442` it was `--prepare-wal MB`, the bench's own loop.)
    #[arg(long)]
    pub prepare_wal: bool,
    /// Before each writer run (after `--quiet-wal`, before `--prepare-wal`), drop the OS
    /// page cache and read the run's copy back into it, so that the copy is cached and
    /// the template it was cloned from is not, as a Hydra server's one database on a
    /// machine with enough memory (root only; see `src/bench/page_cache.rs`).
    #[arg(long)]
    pub warm_copy: bool,
    /// Before each writer run (after `--warm-copy`, before `--prepare-wal`), have the
    /// kernel drop the template's pages from the OS page cache (`posix_fadvise`), the
    /// copy's left as they are: the run's cluster then takes the page cache a Hydra
    /// server's one database would (see `src/bench/page_cache.rs`).
    #[arg(long)]
    pub template_out_of_cache: bool,
    /// Server settings (`name=value`, repeatable) for every second writer run only: the
    /// 2nd, 4th, ... run sets them with `ALTER SYSTEM` and a reload before it starts and
    /// resets them after, so one command measures the writer with and without them side
    /// by side on the same template (two blocks in the table). Settings a reload applies
    /// only; needs `--runs` 2 or more.
    #[arg(long, value_name = "NAME=VALUE")]
    pub alternate_pg_setting: Vec<String>,
    /// Our backfill's `--pause-ms` in every second writer run only (as
    /// `--alternate-pg-setting`; the two may go together).
    #[arg(long, value_name = "MS")]
    pub alternate_pause_ms: Option<u64>,
    /// Our backfill's `--target-batch-ms` in every second writer run only (as
    /// `--alternate-pg-setting`).
    #[arg(long, value_name = "MS")]
    pub alternate_target_batch_ms: Option<u64>,
    /// `--warm-copy` in every second writer run only (as `--alternate-pg-setting`).
    #[arg(long)]
    pub alternate_warm_copy: bool,
    /// `--template-out-of-cache` in every second writer run only (as
    /// `--alternate-pg-setting`).
    #[arg(long)]
    pub alternate_template_out_of_cache: bool,
    /// In each writer run, where the machine's CPU time went during the writer's idle
    /// baseline and during our walk: its split (user, system, iowait, interrupts, steal,
    /// idle) and the busiest threads, PostgreSQL's and the kernel's included, each
    /// with its time on a CPU and runnable waiting for one; and what each disk did (reads,
    /// writes, cache flushes, MB, busy time) and the page cache's size (see
    /// `src/bench/cpu_census.rs` and `src/bench/disk_stats.rs`).
    #[arg(long)]
    pub cpu_census: bool,
    /// Put the throwaway cluster's WAL (`pg_wal`) in a temporary directory under DIR
    /// (initdb's `--waldir`), e.g. on a disk of its own, the data where it always goes;
    /// the table's `storage:` line names the device and filesystem of each.
    #[arg(long, value_name = "DIR")]
    pub wal_dir: Option<PathBuf>,
    /// In each writer run, sample every CPU with `perf record` for this many seconds,
    /// starting 10 s into our walk, and print the busiest processes' functions, kernel
    /// and user space (needs `perf` and root; see `src/bench/perf_profile.rs`). Take
    /// fewer seconds than the walk lasts: the recording does not stop with it.
    #[arg(long, value_name = "SECS")]
    pub perf_profile: Option<u64>,
    /// In each writer run, which files the data disk's writes during our walk went to:
    /// MB per relation of the copy (and per directory of the cluster), the MB of distinct
    /// blocks among them, and PostgreSQL's checkpoints and buffer writes meanwhile (the
    /// kernel's `block:block_rq_issue` tracepoint and `filefrag`; needs root and tracefs;
    /// see `src/bench/disk_write_trace.rs`).
    #[arg(long)]
    pub disk_write_trace: bool,
}

impl BenchArgs {
    /// What every second writer run changes (`--alternate-*`), in words; `None` if nothing.
    pub fn alternate(&self) -> Option<String> {
        let mut parts: Vec<String> = self.alternate_pg_setting.clone();
        if let Some(ms) = self.alternate_pause_ms {
            parts.push(format!("ours' --pause-ms {ms}"));
        }
        if let Some(ms) = self.alternate_target_batch_ms {
            parts.push(format!("ours' --target-batch-ms {ms}"));
        }
        if self.alternate_warm_copy {
            parts.push("--warm-copy".to_owned());
        }
        if self.alternate_template_out_of_cache {
            parts.push("--template-out-of-cache".to_owned());
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// These arguments as every second writer run has them: `--alternate-pause-ms` and
    /// `--alternate-target-batch-ms` in place of ours' own, `--warm-copy` if
    /// `--alternate-warm-copy`, `--template-out-of-cache` if
    /// `--alternate-template-out-of-cache`.
    fn alternated(&self) -> BenchArgs {
        BenchArgs {
            pause_ms: self.alternate_pause_ms.unwrap_or(self.pause_ms),
            target_batch_ms: self
                .alternate_target_batch_ms
                .unwrap_or(self.target_batch_ms),
            warm_copy: self.warm_copy || self.alternate_warm_copy,
            template_out_of_cache: self.template_out_of_cache
                || self.alternate_template_out_of_cache,
            ..self.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub postgres: String,
    pub settings: Vec<(String, String)>,
    /// `kernel.sched_autogroup_enabled`: the kernel weighs sessions, not processes, and
    /// every PostgreSQL server process leads a session of its own.
    pub autogroups: bool,
    /// Where the cluster's data and its WAL live (device, filesystem, mount point).
    pub data_on: String,
    pub wal_on: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BackfillRun {
    pub contender: String,
    pub seconds: f64,
    pub builds_updates: i64,
    pub builds_hot_updates: i64,
    pub hot_share: f64,
    pub bytes_before: i64,
    pub bytes_after: i64,
    pub rows_left: i64,
    pub note: String,
    /// Autovacuum and autoanalyze runs on Builds that ended during the contender.
    pub autovacuums: i64,
    pub autoanalyzes: i64,
    /// WAL the cluster wrote while the contender ran.
    pub wal_bytes: i64,
    /// With `--wal-stats`, our per-page backfill's WAL by resource manager.
    pub wal_kinds: Vec<wal_volume::WalKind>,
    /// Other sessions seen holding back the xmin horizon (which stops pruning, so HOT
    /// updates) while the contender ran: (what, samples taken every `horizon_every_ms`).
    pub horizon_holders: Vec<(String, u64)>,
    /// How often those samples were taken (0: not sampled).
    pub horizon_every_ms: u64,
}

impl BackfillRun {
    /// The cluster's WAL rate while the contender ran.
    pub fn wal_mb_per_s(&self) -> f64 {
        mb(self.wal_bytes) / self.seconds.max(1e-9)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FinalRun {
    pub contender: String,
    pub seconds: f64,
    /// (step, seconds it held a write-blocking lock)
    pub blocking_steps: Vec<(String, f64)>,
    pub online_steps: Vec<(String, f64)>,
    pub longest_block: f64,
    pub longest_block_step: String,
    pub writer: Option<WriterSummary>,
    /// The writer's slowest operations and the steps they overlapped (for the median
    /// row: the slowest of all runs).
    pub slowest_writer_ops: Vec<SlowOp>,
}

/// One of the writer's slowest operations during a final-phase contender.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowOp {
    /// 1-based.
    pub run: usize,
    pub ms: f64,
    /// When it started, in seconds from the start of the final phase (negative: while the
    /// writer settled before it).
    pub at: f64,
    /// The steps its time overlapped, or what ran instead.
    pub during: String,
    /// With `--wal-trace`: what the writer's backend was sampled doing meanwhile, and
    /// what the other client sessions running a statement were (ours; the bench's own
    /// horizon sampler when it happened to run).
    pub waits: Vec<(String, usize)>,
    pub ours_waits: Vec<(String, usize)>,
}

/// How many of the writer's slowest final-phase operations the table names.
const SLOWEST_OPS: usize = 3;

/// The `n` slowest operations in `stats`, placed on the timeline of `steps` (name, start,
/// seconds; starts counted from `t0`).
fn slowest_ops(
    stats: &WriterStats,
    t0: Instant,
    steps: &[(String, f64, f64)],
    trace: Option<&wal_trace::Samples>,
    run: usize,
    n: usize,
) -> Vec<SlowOp> {
    let mut ops: Vec<&workload::Op> = stats.ops.iter().collect();
    ops.sort_by_key(|op| std::cmp::Reverse(op.latency_us));
    let last = steps
        .iter()
        .map(|(_, at, secs)| at + secs)
        .fold(0.0, f64::max);
    ops.into_iter()
        .take(n)
        .map(|op| {
            let at = if op.start >= t0 {
                (op.start - t0).as_secs_f64()
            } else {
                -(t0 - op.start).as_secs_f64()
            };
            let until = at + op.latency_us as f64 / 1e6;
            let overlapped: Vec<&str> = steps
                .iter()
                .filter(|(_, s, secs)| *s < until && at < s + secs)
                .map(|(name, _, _)| name.as_str())
                .collect();
            let during = if !overlapped.is_empty() {
                overlapped.join(" + ")
            } else if until <= 0.0 {
                "before the final phase".into()
            } else if at >= last {
                "after the final phase".into()
            } else {
                "between steps".into()
            };
            let end = op.start + Duration::from_micros(op.latency_us);
            let sampled = trace
                .map(|t| wal_trace::samples_between(&t.samples, op.start, end))
                .unwrap_or_default();
            SlowOp {
                run: run + 1,
                ms: op.latency_us as f64 / 1000.0,
                at,
                during,
                waits: wal_trace::tally(sampled.iter().filter_map(|s| s.writer.as_deref())),
                ours_waits: wal_trace::tally(sampled.iter().filter_map(|s| s.others.as_deref())),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WriterSummary {
    pub seconds: f64,
    pub ops: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The p99 of the evaluator's inserts and of the queue runner's finishes apart.
    pub insert_p99_ms: f64,
    pub finish_p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub lost_updates: usize,
    /// Operations slower than 10 ms and 100 ms (the shape of the tail).
    pub over_10ms: u64,
    pub over_100ms: u64,
    /// The p99 of the operations' waits for a CPU (server process and client thread
    /// runnable but not running, `/proc/<pid>/schedstat`), and the p99 latency had no
    /// operation waited so (each one's latency less its wait): whether a slow
    /// operation waited on the disk or for its turn on a CPU. `None` where not measured.
    pub cpu_wait_p99_ms: Option<f64>,
    pub p99_without_cpu_waits_ms: Option<f64>,
    /// Every operation's latency in ms, in the order they ran; in the medians, every
    /// run's operations pooled (so a percentile over them counts each run's tail).
    pub latencies_ms: Vec<f64>,
}

impl WriterSummary {
    /// This p99 as a multiple of `baseline`'s (the writer alone).
    pub fn p99_over(&self, baseline: &WriterSummary) -> f64 {
        self.p99_ms / baseline.p99_ms.max(1e-9)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WriterRun {
    pub idle: WriterSummary,
    pub during: WriterSummary,
    /// Our per-page backfill while the writer ran.
    pub backfill: BackfillRun,
    /// With `--wal-trace`.
    pub wal_trace: Option<wal_trace::WalTrace>,
    /// The cluster's WAL writer during our backfill, where its `schedstat` can be read.
    pub walwriter: Option<ProcessCpu>,
    /// WAL segments ready in `pg_wal` (named after the one being written) as our backfill
    /// started.
    pub wal_segments_ahead: i64,
    /// With `--quiet-wal`: the segments ahead before and after emptying.
    pub quiet_wal: Option<(i64, i64)>,
    /// With `--warm-copy`: what was read back into the page cache, and how long it took.
    pub warmed: Option<page_cache::Warmed>,
    /// With `--template-out-of-cache`: what dropping the template's pages let go of.
    pub template_evicted: Option<page_cache::Evicted>,
    /// With `--prepare-wal`: the segments ahead before and after `wal prepare`.
    pub prepared_wal: Option<(i64, i64)>,
    /// With `--prepare-wal`: the writer while `wal prepare` ran (its segments are created
    /// while Hydra's commits wait, one at a time).
    pub during_prepare: Option<WriterSummary>,
    /// This run had `--alternate-pg-setting`'s settings and `--alternate-*` options.
    pub alternate: bool,
    /// With `--cpu-census`: the machine during the writer's idle baseline and during our
    /// walk.
    pub cpu_census: Option<(cpu_census::Census, cpu_census::Census)>,
    /// With `--perf-profile`: the cluster's processes by pid, then `perf report`'s
    /// busiest lines.
    pub perf_profile: Option<perf_profile::Profile>,
    /// With `--disk-write-trace`: where the data disk's writes during our walk went.
    pub disk_writes: Option<disk_write_trace::Traced>,
}

/// A server process's time on a CPU and time runnable but waiting for one, over a span.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcessCpu {
    pub on_cpu_ms: f64,
    pub cpu_wait_ms: f64,
}

impl ProcessCpu {
    /// Between two [`workload::server_cpu_us`] readings.
    fn between(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<ProcessCpu> {
        let ((run0, wait0), (run1, wait1)) = (before?, after?);
        Some(ProcessCpu {
            on_cpu_ms: run1.saturating_sub(run0) as f64 / 1000.0,
            cpu_wait_ms: wait1.saturating_sub(wait0) as f64 / 1000.0,
        })
    }
}

/// The writer alone, next to a plain file writer, next to a busy CPU, next to a session
/// writing WAL (`src/bench/disk_control.rs`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskControlRun {
    pub mb_per_s: f64,
    /// Where the rate came from.
    pub rate_source: String,
    pub achieved_mb_per_s: f64,
    pub idle: WriterSummary,
    pub file: WriterSummary,
    pub cpu: WriterSummary,
    /// Next to WAL written in 1 MB bursts.
    pub wal: WriterSummary,
    pub achieved_wal_mb_per_s: f64,
    /// Next to WAL written as a stream of 8 kB messages.
    pub wal_stream: WriterSummary,
    pub achieved_wal_stream_mb_per_s: f64,
    /// Next to the same stream and a busy CPU at once: a busy CPU and our rate of WAL,
    /// without the rest of a backfill's work in the server.
    pub cpu_and_wal_stream: WriterSummary,
    pub achieved_cpu_and_wal_stream_mb_per_s: f64,
    /// Next to a busy CPU that goes through memory (`disk_control::memory_load`), and the
    /// rate at which it did.
    pub memory: WriterSummary,
    pub memory_mb_per_s: f64,
    /// Next to that and the WAL stream at once.
    pub memory_and_wal_stream: WriterSummary,
    pub achieved_memory_and_wal_stream_mb_per_s: f64,
    /// Next to the memory thread held to each rate of `--memory-rates`.
    pub memory_paced: Vec<PacedMemory>,
    /// Next to our per-page backfill running in another database of the cluster.
    pub ours_elsewhere: WriterSummary,
    pub ours_elsewhere_backfill: BackfillRun,
}

/// The writer next to disk-control's memory thread held to a rate, alone and next to the
/// WAL stream at our backfill's rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PacedMemory {
    pub mb_per_s: f64,
    pub achieved_mb_per_s: f64,
    pub writer: WriterSummary,
    pub with_wal_stream: WriterSummary,
    pub achieved_wal_stream_mb_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRun {
    pub command: String,
    pub max_rss_mb: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Template {
    pub builds: i64,
    pub jobs: i64,
    pub builds_heap_pages: i64,
    pub builds_bytes: i64,
    pub load_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub order: Vec<String>,
    pub backfill: Vec<BackfillRun>,
    pub final_phase: Vec<FinalRun>,
    pub writer: Option<WriterRun>,
    pub disk_control: Option<DiskControlRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bench {
    pub spec: synth::Spec,
    pub runs_requested: usize,
    pub writer_pause_ms: u64,
    pub writer_secs: u64,
    /// `--control-secs`: each of disk-control's phases.
    pub control_secs: u64,
    pub ours_target_batch_ms: u64,
    pub ours_pause_ms: u64,
    /// Our backfill's `--max-batch-size`.
    pub ours_max_batch: u64,
    /// Our backfill's `--pin-cpu`.
    pub ours_pin_cpu: String,
    /// `--slice-ours`, when given.
    pub ours_slice_ms: Option<f64>,
    /// `--writer-horizon-ms`.
    pub writer_horizon_ms: u64,
    /// `--nice-ours`, when given.
    pub ours_nice: Option<i32>,
    /// `--nice-walwriter`, when given.
    pub walwriter_nice: Option<i32>,
    /// `--walwriter-cpus`, when given.
    pub walwriter_cpus: Option<String>,
    /// `--pin-ours`.
    pub ours_pinned: bool,
    /// `--idle-ours`.
    pub ours_sched_idle: bool,
    /// `--idle-group-ours`.
    pub ours_idle_group: bool,
    /// `--ours-setting`, as given.
    pub ours_settings: Vec<String>,
    /// What the writer's even-numbered runs changed (`--alternate-*`), in words.
    pub alternate: Option<String>,
    pub machine: Machine,
    pub template: Template,
    pub runs: Vec<Run>,
    pub memory: Option<MemoryRun>,
    pub medians: Medians,
    pub table: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Medians {
    pub backfill: Vec<BackfillRun>,
    pub final_phase: Vec<FinalRun>,
    pub writer: Option<WriterRun>,
    /// With `--alternate-*`: the writer runs that had them (`writer` then holds the
    /// others).
    pub writer_alternate: Option<WriterRun>,
    pub disk_control: Option<DiskControlRun>,
}

fn say(msg: &str) {
    eprintln!("[bench {}] {msg}", chrono_now());
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

fn engine_out() -> Out {
    Out {
        mode: Mode::Lines,
        line_interval: Duration::from_secs(30),
    }
}

/// Our backfill options: the command line's defaults, with the strategy forced and the
/// bench's `--target-batch-ms` / `--pause-ms` / `--max-batch-size`.
pub fn ours_options(strategy: StrategyChoice, args: &BenchArgs) -> backfill::Options {
    let mut defaults = crate::cli::BackfillArgs::defaults();
    if let Some(n) = args.max_batch_size {
        defaults.max_batch_size = n;
    }
    backfill::Options {
        strategy,
        target_batch: Duration::from_millis(args.target_batch_ms),
        pause: Duration::from_millis(args.pause_ms),
        pin_cpu: if args.pin_ours {
            PinCpu::Off
        } else {
            args.pin_cpu
        },
        ..backfill::Options::from_args(&defaults, &crate::config::Config::default())
    }
}

/// The machine and the server, with the settings every table prints and those the command
/// line changed (`--pg-setting`), so a table says what it ran with.
fn machine(cluster: &PgCluster, db: &mut Db, pg_settings: &[String]) -> Result<Machine> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let (data, wal) = cluster.storage();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mem_kb = proc_stat::meminfo_now_kb("MemTotal").unwrap_or(0) as f64;
    let c = db.client();
    let postgres: String = c.query_one("SELECT version()", &[])?.get(0);
    let mut settings: Vec<(String, String)> = Vec::new();
    let changed = pg_settings.iter().map(|s| {
        s.split_once('=')
            .map_or(s.as_str(), |(name, _)| name.trim())
    });
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "shared_buffers",
        "max_wal_size",
        "checkpoint_timeout",
        "wal_level",
        "maintenance_work_mem",
        "work_mem",
        "autovacuum",
    ]
    .into_iter()
    .chain(changed)
    {
        if settings.iter().any(|(n, _)| n == name) {
            continue;
        }
        let v: String = c.query_one("SELECT current_setting($1)", &[&name])?.get(0);
        settings.push((name.to_owned(), v));
    }
    Ok(Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        memory_gib: mem_kb / 1_048_576.0,
        postgres,
        settings,
        autogroups: nice::autogroups_on(),
        data_on: mounted_on(&data, &mounts),
        wal_on: mounted_on(&wal, &mounts),
    })
}

/// "`device` (`fstype`, `mountpoint`)" of the mount holding `path` in `mounts` (the text
/// of `/proc/self/mounts`): the longest mount point above it, the last one mounted there.
fn mounted_on(path: &Path, mounts: &str) -> String {
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Mount points escape spaces as \040.
            let (device, point, fstype) = (f.first()?, f.get(1)?.replace("\\040", " "), f.get(2)?);
            path.starts_with(&point)
                .then(|| (point.len(), format!("{device} ({fstype}, {point})")))
        })
        // The last of the longest: a mount over another comes later in the file.
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".to_owned(), |(_, m)| m)
}

/// A fresh copy of `template` named `name` (dropped first if left over), then a
/// checkpoint so that no contender pays for writing out the copy.
fn clone_db(cluster: &PgCluster, template: &str, name: &str) -> Result<Db> {
    drop_db(cluster, name)?;
    cluster.create_database(name, Some(template))?;
    cluster
        .connect("postgres")?
        .client()
        .batch_execute("CHECKPOINT")?;
    cluster.connect(name)
}

/// Drop a contender's copy, ending its sessions first (`DROP DATABASE ... WITH (FORCE)`
/// would need PostgreSQL 13).
fn drop_db(cluster: &PgCluster, name: &str) -> Result<()> {
    let mut db = cluster.connect("postgres")?;
    db.client()
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .with_context(|| format!("ending the sessions of {name}"))?;
    db.client()
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .with_context(|| format!("dropping {name}"))
}

/// Builds' (updates, HOT updates, table + index bytes), with this session's counters
/// flushed first so they include its own latest statements. Before PostgreSQL 15 a
/// session sends its counters when idle at most every 0.5 s (and at exit): wait that out,
/// send them with a statement, and read a fresh snapshot.
fn builds_stats(db: &mut Db) -> Result<(i64, i64, i64, i64, i64)> {
    if db.server_version()? >= 150_000 {
        db.client()
            .batch_execute("SELECT pg_stat_force_next_flush()")?;
    } else {
        std::thread::sleep(Duration::from_millis(600));
        db.client().batch_execute("SELECT 1")?;
        db.client()
            .batch_execute("SELECT pg_stat_clear_snapshot()")?;
    }
    let r = db.client().query_one(
        "SELECT coalesce(n_tup_upd, 0), coalesce(n_tup_hot_upd, 0), pg_total_relation_size(relid),
                autovacuum_count, autoanalyze_count
           FROM pg_stat_user_tables WHERE relid = 'builds'::regclass",
        &[],
    )?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
}

/// How often the horizon sampler looks, unless `--writer-horizon-ms` says otherwise.
const HORIZON_SAMPLE_MS: u64 = 50;

/// Samples, every `every` (50 ms unless told), which other sessions of the cluster hold
/// an xmin (a snapshot or transaction that keeps dead row versions from being pruned). A
/// plain VACUUM's xmin does not keep them (see `per_page::PLAIN_VACUUM`) and is left out,
/// as the backfill leaves it out.
struct HorizonSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Vec<(String, u64)>>>,
}

fn start_sampler(cluster: &PgCluster, exclude_pid: i32, every: Duration) -> Result<HorizonSampler> {
    let mut db = cluster.connect("postgres")?;
    // Named apart from our backfill's session in `--cpu-census`.
    db.client()
        .batch_execute("SET application_name = 'bench horizon sampler'")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    // As the engine's own check (`per_page::horizon_holders`): a snapshot as old as the
    // contender's running transaction keeps that transaction's dead row versions from
    // being pruned. Between transactions the contender has no xid and nothing counts.
    let sql = format!(
        "SELECT coalesce(backend_type, ''), coalesce(application_name, ''),
                left(coalesce(query, ''), 60)
           FROM pg_stat_activity
          WHERE pid <> pg_backend_pid() AND pid <> $1 AND {}",
        crate::backfill::per_page::holds_horizon_of(
            "(SELECT backend_xid FROM pg_stat_activity WHERE pid = $1)"
        )
    );
    let handle = std::thread::Builder::new()
        .name("horizon".to_owned())
        .spawn(move || {
            let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
            while !flag.load(Ordering::SeqCst) {
                let rows = db.client().query(&sql, &[&exclude_pid])?;
                for r in rows {
                    let (kind, app, query): (String, String, String) =
                        (r.get(0), r.get(1), r.get(2));
                    let what = if kind == "client backend" {
                        format!("client backend ({app})")
                    } else {
                        format!("{kind}: {query}")
                    };
                    *seen.entry(what).or_default() += 1;
                }
                std::thread::sleep(every);
            }
            Ok(seen.into_iter().collect())
        })?;
    Ok(HorizonSampler { stop, handle })
}

fn stop_sampler(s: Option<HorizonSampler>) -> Result<Vec<(String, u64)>> {
    let Some(s) = s else {
        return Ok(Vec::new());
    };
    s.stop.store(true, Ordering::SeqCst);
    s.handle
        .join()
        .map_err(|_| anyhow::anyhow!("the horizon sampler panicked"))?
}

fn rows_left(db: &mut Db) -> Result<i64> {
    Ok(db
        .client()
        .query_one(
            "SELECT (SELECT count(*) FROM builds WHERE jobset_id IS NULL)
                  + (SELECT count(*) FROM jobs WHERE jobset_id IS NULL)",
            &[],
        )?
        .get(0))
}

fn measure_backfill(
    cluster: &PgCluster,
    db: &mut Db,
    contender: &str,
    wal_stats: bool,
    horizon_every_ms: u64,
    work: impl FnOnce(&mut Db) -> Result<String>,
) -> Result<BackfillRun> {
    let before = builds_stats(db)?;
    let wal_start = wal_volume::position(db)?;
    let pid = db.backend_pid()?;
    let sampler = match horizon_every_ms {
        0 => None,
        ms => Some(start_sampler(cluster, pid, Duration::from_millis(ms))?),
    };
    let t0 = Instant::now();
    let note = work(db);
    let seconds = t0.elapsed().as_secs_f64();
    let horizon_holders = stop_sampler(sampler)?;
    let note = note?;
    let wal_end = wal_volume::position(db)?;
    let wal_kinds = if wal_stats {
        wal_volume::breakdown(cluster, db, wal_start, wal_end)?
    } else {
        Vec::new()
    };
    let after = builds_stats(db)?;
    let (upd, hot) = (after.0 - before.0, after.1 - before.1);
    Ok(BackfillRun {
        contender: contender.to_owned(),
        seconds,
        builds_updates: upd,
        builds_hot_updates: hot,
        hot_share: if upd > 0 {
            hot as f64 / upd as f64
        } else {
            0.0
        },
        bytes_before: before.2,
        bytes_after: after.2,
        rows_left: rows_left(db)?,
        note,
        autovacuums: after.3 - before.3,
        autoanalyzes: after.4 - before.4,
        wal_bytes: wal_end - wal_start,
        wal_kinds,
        horizon_holders,
        horizon_every_ms,
    })
}

/// `--ours-setting name=value` on our backfill's session, for this session only.
fn set_for_session(db: &mut Db, setting: &str) -> Result<()> {
    let (name, value) = setting
        .split_once('=')
        .with_context(|| format!("--ours-setting {setting:?}: expected NAME=VALUE"))?;
    db.client()
        .query_one("SELECT set_config($1, $2, false)", &[&name, &value])
        .with_context(|| format!("setting {name} = {value} for our backfill's session"))?;
    Ok(())
}

fn ours(db: &mut Db, strategy: StrategyChoice, args: &BenchArgs) -> Result<String> {
    // Our server process, for the diagnostics that move it (`--nice-ours`,
    // `--idle-ours`, `--idle-group-ours`, `--slice-ours`, `--pin-ours`).
    let pid = db.backend_pid()?;
    for setting in &args.ours_setting {
        set_for_session(db, setting)?;
    }
    if let Some(n) = args.nice_ours {
        nice::set(pid, n)?;
    }
    let walwriter = match args.nice_walwriter {
        Some(n) => {
            let pid = walwriter_pid(db)?;
            nice::set(pid, n)?;
            Some(pid)
        }
        None => None,
    };
    let walwriter_placed = match &args.walwriter_cpus {
        Some(cpus) => Some(pin::only(walwriter_pid(db)? as u32, cpus)?),
        None => None,
    };
    let idled = if args.idle_ours {
        Some(idle::ours(pid)?)
    } else {
        None
    };
    let grouped = if args.idle_group_ours {
        Some(idle_group::ours(pid)?)
    } else {
        None
    };
    let sliced = match args.slice_ours {
        Some(ms) => Some(slice::ours(pid, Duration::from_secs_f64(ms / 1e3))?),
        None => None,
    };
    let pinned = if args.pin_ours {
        Some(pin::apart(db, pid)?)
    } else {
        None
    };
    let report = backfill::run(
        db,
        &ours_options(strategy, args),
        &engine_out(),
        &Interrupt::default(),
    );
    if let Some(p) = pinned {
        p.undo();
    }
    if let Some(i) = idled {
        i.undo()?;
    }
    if let Some(g) = grouped {
        g.undo()?;
    }
    if let Some(s) = sliced {
        s.undo();
    }
    if let Some(pid) = walwriter {
        nice::set(pid, 0)?;
    }
    if let Some(p) = walwriter_placed {
        p.undo();
    }
    let report = report?;
    Ok(report
        .tables
        .iter()
        .map(|t| {
            format!(
                "{}: {} rows, {}, {} transactions, {} retries",
                t.table.name(),
                t.rows_updated,
                t.strategy,
                t.transactions,
                t.retries
            )
        })
        .collect::<Vec<_>>()
        .join("; "))
}

/// The cluster's WAL writer.
fn walwriter_pid(db: &mut Db) -> Result<i32> {
    Ok(db
        .client()
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'",
            &[],
        )
        .context("finding the WAL writer's process")?
        .get(0))
}

fn run_backfill_contender(
    cluster: &PgCluster,
    contender: &str,
    run: usize,
    args: &BenchArgs,
) -> Result<BackfillRun> {
    let name = format!("bench_{}_{run}", contender.replace('-', "_"));
    let mut db = clone_db(cluster, TEMPLATE, &name)?;
    say(&format!("run {}: backfill contender {contender}", run + 1));
    let wal_stats = args.wal_stats && contender == "per-page";
    let r = measure_backfill(
        cluster,
        &mut db,
        contender,
        wal_stats,
        HORIZON_SAMPLE_MS,
        |db| match contender {
            "offline" => stock::offline(db).map(|_| String::new()),
            "stock" => stock::stock(db)
                .map(|c| format!("{} batches, {} database-wide VACUUMs", c.batches, c.vacuums)),
            "per-page" => ours(db, StrategyChoice::PerPage, args),
            "keyset" => ours(db, StrategyChoice::Keyset, args),
            other => bail!("unknown backfill contender {other}"),
        },
    )?;
    drop(db);
    drop_db(cluster, &name)?;
    say(&format!(
        "  {contender}: {:.2}s, HOT {:.1} %, Builds {:.1} -> {:.1} MB, rows left {}",
        r.seconds,
        100.0 * r.hot_share,
        mb(r.bytes_before),
        mb(r.bytes_after),
        r.rows_left
    ));
    Ok(r)
}

/// A running writer thread.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<WriterStats>>,
    start: Instant,
}

impl Writer {
    /// Ask the writer to stop after its current operation; [`stop_writer`] then collects
    /// it. Set the moment the measured work ends, so that what the bench reads afterwards
    /// (the count of rows left NULL is a parallel scan of Builds) is not counted as
    /// happening during it.
    fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn start_writer(cluster: &PgCluster, dbname: &str, pause_ms: u64, seed: u64) -> Writer {
    let dsn = cluster.dsn(dbname);
    let stop = Arc::new(AtomicBool::new(false));
    let spec = WriterSpec {
        with_jobset_id: true,
        pause: Duration::from_millis(pause_ms),
        seed,
        max_ops: 0,
        slice: (1, 0),
    };
    let flag = Arc::clone(&stop);
    let handle = std::thread::Builder::new()
        .name("writer".to_owned())
        .spawn(move || workload::run(&dsn, &spec, flag))
        .expect("spawning the writer thread");
    Writer {
        stop,
        handle,
        start: Instant::now(),
    }
}

fn stop_writer(w: Writer, db: &mut Db) -> Result<WriterSummary> {
    stop_writer_with_stats(w, db).map(|(summary, _)| summary)
}

fn stop_writer_with_stats(w: Writer, db: &mut Db) -> Result<(WriterSummary, WriterStats)> {
    w.signal_stop();
    let stats = w
        .handle
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    // From its start to the end of its last operation.
    let seconds = stats.ops.last().map_or(0.0, |op| {
        op.start.duration_since(w.start).as_secs_f64() + op.latency_us as f64 / 1e6
    });
    let lost = workload::lost_updates(db, &stats)?;
    let summary = WriterSummary {
        seconds,
        ops: stats.inserts + stats.updates,
        p50_ms: stats.percentile_ms(50.0),
        p99_ms: stats.percentile_ms(99.0),
        insert_p99_ms: stats.percentile_ms_of(true, 99.0),
        finish_p99_ms: stats.percentile_ms_of(false, 99.0),
        max_ms: stats.percentile_ms(100.0),
        errors: stats.errors,
        error_samples: stats.error_samples.clone(),
        lost_updates: lost.len(),
        over_10ms: stats.count_over_ms(10),
        over_100ms: stats.count_over_ms(100),
        cpu_wait_p99_ms: stats.cpu_wait_percentile_ms(99.0),
        p99_without_cpu_waits_ms: stats.percentile_ms_without_cpu_waits(99.0),
        latencies_ms: stats
            .ops
            .iter()
            .map(|op| op.latency_us as f64 / 1000.0)
            .collect(),
    };
    Ok((summary, stats))
}

/// Give the writer time to connect, load its jobs and reach its steady rate before the
/// final phase starts (its maximum latency is what is reported, so idle operations
/// before and after do not dilute it).
fn settle_writer() {
    std::thread::sleep(Duration::from_millis(1_500));
}

fn run_final_contender(
    cluster: &PgCluster,
    contender: &str,
    run: usize,
    args: &BenchArgs,
) -> Result<FinalRun> {
    let name = format!("bench_{}_{run}", contender.replace('-', "_"));
    let mut db = clone_db(cluster, TEMPLATE_FILLED, &name)?;
    say(&format!(
        "run {}: final phase contender {contender}",
        run + 1
    ));
    let writer = (!args.skip_writer)
        .then(|| start_writer(cluster, &name, args.writer_pause_ms, 1_000 + run as u64));
    let sampler =
        (writer.is_some() && args.wal_trace).then(|| wal_trace::Sampler::start(cluster.dsn(&name)));
    if writer.is_some() {
        settle_writer();
    }
    let t0 = Instant::now();
    let mut r = FinalRun {
        contender: contender.to_owned(),
        ..FinalRun::default()
    };
    // Every step on one timeline: (name, start in seconds from t0, seconds).
    let mut timeline: Vec<(String, f64, f64)> = Vec::new();
    match contender {
        "final-stock" => {
            // hydra-init: one transaction per upgrade file; each holds its lock (ACCESS
            // EXCLUSIVE for SET NOT NULL, SHARE for CREATE INDEX: both block writes to
            // the table) until it commits.
            for step in hydra_schema::apply_steps(&mut db, hydra_schema::FINAL_VERSION)? {
                let name = format!("upgrade-{}", step.version);
                let secs = step.duration.as_secs_f64();
                timeline.push((name.clone(), step.at.as_secs_f64(), secs));
                r.blocking_steps.push((name, secs));
            }
        }
        "final-ours" => {
            let report = finalize::run(
                &mut db,
                &finalize::Options::defaults(),
                &engine_out(),
                &crate::interrupt::Interrupt::default(),
            )?;
            for (steps, into) in [
                (&report.blocking_steps, &mut r.blocking_steps),
                (&report.online_steps, &mut r.online_steps),
            ] {
                for s in steps {
                    timeline.push((s.step.clone(), s.at, s.seconds));
                    into.push((s.step.clone(), s.seconds));
                }
            }
        }
        other => bail!("unknown final-phase contender {other}"),
    }
    r.seconds = t0.elapsed().as_secs_f64();
    if let Some(w) = writer {
        // Let the writer's last blocked operation finish and record it.
        std::thread::sleep(Duration::from_millis(500));
        let (summary, stats) = stop_writer_with_stats(w, &mut db)?;
        let trace = sampler.map(wal_trace::Sampler::stop).transpose()?;
        r.writer = Some(summary);
        r.slowest_writer_ops = slowest_ops(&stats, t0, &timeline, trace.as_ref(), run, SLOWEST_OPS);
    }
    let version: i32 = db
        .client()
        .query_one("SELECT version FROM SchemaVersion", &[])?
        .get(0);
    if version != hydra_schema::FINAL_VERSION {
        bail!("{contender} ended at schema {version}, not 65");
    }
    if let Some((step, secs)) = r.blocking_steps.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
        r.longest_block = *secs;
        r.longest_block_step = step.clone();
    }
    drop(db);
    drop_db(cluster, &name)?;
    say(&format!(
        "  {contender}: {:.2}s, longest write-blocking step {:.3}s ({}), writer max {}",
        r.seconds,
        r.longest_block,
        r.longest_block_step,
        r.writer
            .as_ref()
            .map(|w| format!("{:.1} ms", w.max_ms))
            .unwrap_or_else(|| "-".into())
    ));
    Ok(r)
}

/// The writer on `dbname` for `secs`, with nothing of ours running; with a
/// [`cpu_census`] of the span when `census` is set.
fn writer_for_a_while(
    cluster: &PgCluster,
    dbname: &str,
    db: &mut Db,
    args: &BenchArgs,
    secs: u64,
    seed: u64,
    census: bool,
) -> Result<(WriterSummary, Option<cpu_census::Census>)> {
    let w = start_writer(cluster, dbname, args.writer_pause_ms, seed);
    let span = CensusSpan::start(census)?;
    std::thread::sleep(Duration::from_secs(secs));
    let census = span.end(db, false);
    let summary = stop_writer(w, db)?;
    Ok((summary, census?.0))
}

/// `--cpu-census` over one span: a reading of the machine at its start; at its end the
/// census, the cluster's processes named while the writer's session is still connected.
struct CensusSpan(Option<cpu_census::Snapshot>);

impl CensusSpan {
    fn start(on: bool) -> Result<CensusSpan> {
        Ok(CensusSpan(on.then(cpu_census::Snapshot::take).transpose()?))
    }

    /// The census (when on), and the cluster's processes by pid ([`server_names`]) when
    /// the census or `also_names` wants them, read once after the span's last reading.
    /// `db` is our backfill's session (idle in the writer's baseline).
    fn end(
        self,
        db: &mut Db,
        also_names: bool,
    ) -> Result<(Option<cpu_census::Census>, ServerNames)> {
        let after = self
            .0
            .as_ref()
            .map(|_| cpu_census::Snapshot::take())
            .transpose()?;
        let names = if self.0.is_some() || also_names {
            server_names(db)?
        } else {
            Vec::new()
        };
        let census = self.0.zip(after).map(|(before, after)| {
            cpu_census::census(&before, &after, &names.iter().cloned().collect())
        });
        Ok((census, names))
    }
}

/// The cluster's processes by pid, with their names.
type ServerNames = Vec<(u32, String)>;

/// The cluster's processes by pid, named by `application_name` or backend type; `db`'s
/// own (our backfill's session) as "ours (server)".
fn server_names(db: &mut Db) -> Result<ServerNames> {
    let ours = db.backend_pid()?;
    let mut names = Vec::new();
    for r in db.client().query(
        "SELECT pid, coalesce(nullif(application_name, ''), backend_type, '') FROM pg_stat_activity ORDER BY pid",
        &[],
    )? {
        let (pid, name): (i32, String) = (r.get(0), r.get(1));
        let name = if pid == ours {
            "ours (server)".to_owned()
        } else {
            format!("postgres: {name}")
        };
        names.push((pid as u32, name));
    }
    Ok(names)
}

fn run_writer(cluster: &PgCluster, run: usize, args: &BenchArgs) -> Result<WriterRun> {
    let name = format!("bench_writer_{run}");
    let alternate_args;
    let (alternate, args) = match args.alternate() {
        Some(what) if !run.is_multiple_of(2) => {
            say(&format!("run {}: with {what}", run + 1));
            alternate_args = args.alternated();
            (true, &alternate_args)
        }
        _ => (false, args),
    };
    let alternated = if alternate && !args.alternate_pg_setting.is_empty() {
        Some(alternate_set(cluster, &args.alternate_pg_setting)?)
    } else {
        None
    };
    let mut db = clone_db(cluster, TEMPLATE, &name)?;
    let quiet_wal = if args.quiet_wal {
        let (before, after) = quiet_wal::empty(&mut db)?;
        say(&format!(
            "run {}: pg_wal emptied of ready segments: {before} -> {after} ahead",
            run + 1
        ));
        Some((before, after))
    } else {
        None
    };
    let warmed = if args.warm_copy {
        let w = page_cache::warm(&mut db)?;
        say(&format!(
            "run {}: page cache dropped, the copy read back in: {:.0} MB in {:.1} s; \
             the page cache's file pages in huge folios then: {:.0} MB",
            run + 1,
            w.mb,
            w.seconds,
            w.huge_mb
        ));
        Some(w)
    } else {
        None
    };
    let template_evicted = if args.template_out_of_cache {
        let e = page_cache::evict(&cluster.database_dir(database_oid(&mut db, TEMPLATE)?))?;
        say(&format!(
            "run {}: the template's {} files ({:.0} MB) out of the page cache: it gave up {:.0} MB",
            run + 1,
            e.files,
            e.mb,
            e.released_mb
        ));
        Some(e)
    } else {
        None
    };
    let mut during_prepare = None;
    let prepared_wal = if args.prepare_wal {
        let before = quiet_wal::segments_ahead(&mut db)?;
        let w = start_writer(cluster, &name, args.writer_pause_ms, 1_000 + run as u64);
        let r = wal_prepare::prepare(
            &mut db,
            &wal_prepare::Options {
                pause: Duration::from_millis(100),
            },
            &engine_out(),
            &Interrupt::default(),
        );
        let writer = stop_writer(w, &mut db)?;
        let r = r?;
        say(&format!(
            "  during wal prepare: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} over 10 ms",
            writer.ops, writer.p50_ms, writer.p99_ms, writer.max_ms, writer.over_10ms
        ));
        during_prepare = Some(writer);
        let after = quiet_wal::segments_ahead(&mut db)?;
        say(&format!(
            "run {}: wal prepare: {} MB kept for {} MB of WAL, {} switches in {:.1} s: {before} -> {after} ahead",
            run + 1,
            r.keep_bytes >> 20,
            r.expected_bytes >> 20,
            r.segments_switched,
            r.seconds
        ));
        Some((before, after))
    } else {
        None
    };
    say(&format!(
        "run {}: writer alone for {} s",
        run + 1,
        args.writer_secs
    ));
    let (idle, census_idle) = writer_for_a_while(
        cluster,
        &name,
        &mut db,
        args,
        args.writer_secs,
        2_000 + run as u64,
        args.cpu_census,
    )?;
    say(&format!(
        "  idle: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        idle.ops, idle.p50_ms, idle.p99_ms, idle.max_ms
    ));
    say(&format!(
        "run {}: writer during our per-page backfill",
        run + 1
    ));
    // No settling time here: every operation the writer records must overlap the
    // backfill (the writer stops the moment the backfill ends).
    let sampler = args
        .wal_trace
        .then(|| wal_trace::Sampler::start(cluster.dsn(&name)));
    // Our asynchronous commits leave their WAL to the WAL writer, and a Hydra commit that
    // finds it holding the WAL write lock waits for it: its own waits for a CPU.
    let walwriter_pid = walwriter_pid(&mut db)?;
    let wal_segments_ahead = quiet_wal::segments_ahead(&mut db)?;
    let w = start_writer(cluster, &name, args.writer_pause_ms, 3_000 + run as u64);
    let walwriter_before = workload::server_cpu_us(walwriter_pid);
    let mut walwriter_after = None;
    let span = CensusSpan::start(args.cpu_census)?;
    let mut span_end = Ok((None, Vec::new()));
    let recording = args
        .perf_profile
        .map(|secs| perf_profile::start(&cluster.socket_dir().join("bench-perf.data"), secs))
        .transpose()?;
    let bgwriter_before = args
        .disk_write_trace
        .then(|| disk_write_trace::BgWriter::read(&mut db))
        .flatten();
    let tracer = args
        .disk_write_trace
        .then(|| disk_write_trace::start(&cluster.data()))
        .transpose()?;
    let mut traced = None;
    let backfill = measure_backfill(
        cluster,
        &mut db,
        if alternate {
            "per-page + writer, alternate"
        } else {
            "per-page + writer"
        },
        false,
        args.writer_horizon_ms,
        |db| {
            let note = ours(db, StrategyChoice::PerPage, args);
            walwriter_after = workload::server_cpu_us(walwriter_pid);
            span_end = span.end(db, recording.is_some());
            traced = tracer.map(disk_write_trace::Tracer::stop);
            w.signal_stop();
            note
        },
    )?;
    let walwriter = ProcessCpu::between(walwriter_before, walwriter_after);
    let (census_during, names) = span_end?;
    let cpu_census = census_idle.zip(census_during);
    let perf_profile = match recording {
        Some(r) => Some(perf_profile::Profile {
            pids: names,
            lines: r.finish()?,
        }),
        None => None,
    };
    let (during, stats) = stop_writer_with_stats(w, &mut db)?;
    let disk_writes = match traced {
        Some(writes) => {
            let writes = writes?;
            let files = disk_write_trace::files_of(
                &cluster.data(),
                &cluster.database_dir(database_oid(&mut db, &name)?),
                &disk_write_trace::relations(&mut db)?,
            )?;
            let mut t = writes.attribute(&files)?;
            t.bgwriter = bgwriter_before
                .zip(disk_write_trace::BgWriter::read(&mut db))
                .map(|(before, after)| after.since(&before));
            say(&format!(
                "  disk writes during the walk (--disk-write-trace), {}",
                t.describe()
            ));
            Some(t)
        }
        None => None,
    };
    if let Some(before) = &alternated {
        alternate_reset(cluster, before)?;
    }
    let wal_trace = match sampler {
        Some(s) => {
            let t = wal_trace::analyse(&s.stop()?, &stats, 2.0 * idle.p99_ms);
            say(&format!(
                "  WAL (--wal-trace), kB inserted while an operation ran / unflushed at its start:\n{}",
                t.describe()
            ));
            Some(t)
        }
        None => None,
    };
    say(&format!(
        "  during: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors, {} lost updates; backfill {:.2}s HOT {:.1} %{}",
        during.ops,
        during.p50_ms,
        during.p99_ms,
        during.max_ms,
        during.errors,
        during.lost_updates,
        backfill.seconds,
        100.0 * backfill.hot_share,
        walwriter
            .map(|c| format!(
                "; WAL writer {:.0} ms on a CPU, {:.0} ms waiting for one",
                c.on_cpu_ms, c.cpu_wait_ms
            ))
            .unwrap_or_default()
    ));
    if prepared_wal.is_some() {
        wal_prepare::reset(&mut db, &engine_out())?;
    }
    drop(db);
    drop_db(cluster, &name)?;
    Ok(WriterRun {
        idle,
        during,
        backfill,
        wal_trace,
        wal_segments_ahead,
        quiet_wal,
        warmed,
        template_evicted,
        prepared_wal,
        during_prepare,
        walwriter,
        alternate,
        cpu_census,
        perf_profile,
        disk_writes,
    })
}

/// The `pg_database.oid` of the database `name` (its directory under `base/`).
fn database_oid(db: &mut Db, name: &str) -> Result<u32> {
    Ok(db
        .client()
        .query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&name])?
        .get(0))
}

/// `--alternate-pg-setting`: set the settings with `ALTER SYSTEM` and reload; returns
/// each one's name and value before, for [`alternate_reset`].
fn alternate_set(cluster: &PgCluster, settings: &[String]) -> Result<Vec<(String, String)>> {
    let mut db = cluster.connect("postgres")?;
    let mut before = Vec::new();
    for s in settings {
        let (name, value) = s
            .split_once('=')
            .with_context(|| format!("--alternate-pg-setting {s:?} is not name=value"))?;
        let setting = wal_prepare::setting(&mut db, name).context("--alternate-pg-setting")?;
        let context: String = db
            .client()
            .query_one("SELECT context FROM pg_settings WHERE name = $1", &[&name])?
            .get(0);
        if matches!(context.as_str(), "internal" | "postmaster") {
            bail!("--alternate-pg-setting {name}: a reload cannot change it ({context})");
        }
        wal_prepare::alter_system(&mut db, name, Some(value)).context("--alternate-pg-setting")?;
        before.push((name.to_owned(), setting));
    }
    reload_until(&mut db, &before, |now, was| now != was).with_context(|| {
        format!(
            "--alternate-pg-setting {}: is it already the server's value?",
            settings.join(" ")
        )
    })?;
    Ok(before)
}

/// Undo [`alternate_set`]: `ALTER SYSTEM RESET` and reload, until each is as before.
fn alternate_reset(cluster: &PgCluster, before: &[(String, String)]) -> Result<()> {
    let mut db = cluster.connect("postgres")?;
    for (name, _) in before {
        wal_prepare::alter_system(&mut db, name, None)?;
    }
    reload_until(&mut db, before, |now, was| now == was)
}

/// Reload the server's configuration and wait until each setting's value passes
/// `done(now, recorded)`.
fn reload_until(
    db: &mut Db,
    recorded: &[(String, String)],
    done: impl Fn(&str, &str) -> bool,
) -> Result<()> {
    wal_prepare::reload(db)?;
    let names: Vec<&str> = recorded.iter().map(|(name, _)| name.as_str()).collect();
    wal_prepare::wait_for_settings(db, &names, |name, now| {
        recorded
            .iter()
            .any(|(recorded, was)| recorded == name && done(now, was))
    })
}

fn run_disk_control(
    cluster: &PgCluster,
    run: usize,
    args: &BenchArgs,
    mb_per_s: f64,
    rate_source: &str,
) -> Result<DiskControlRun> {
    if !(mb_per_s.is_finite() && mb_per_s > 0.0) {
        bail!("disk-control needs a rate above 0 MB/s, not {mb_per_s} ({rate_source})");
    }
    let name = format!("bench_disk_{run}");
    let mut db = clone_db(cluster, TEMPLATE, &name)?;
    let file = disk_control::FileLoad::prepare(&cluster.socket_dir().join("disk-control.dat"))?;
    say(&format!(
        "run {}: controls: writer alone for {} s, then as long next to a file written at {mb_per_s:.1} MB/s, next to a busy CPU, next to a session writing {mb_per_s:.1} MB/s of WAL in 1 MB bursts, then streamed in 8 kB messages, then that stream next to the busy CPU, next to a thread going through {} MiB of memory, that thread next to the stream, then next to our backfill of another database",
        run + 1,
        args.control_secs,
        disk_control::MEMORY_LOAD_MIB
    ));
    let mut measure = |seed: u64| {
        writer_for_a_while(
            cluster,
            &name,
            &mut db,
            args,
            args.control_secs,
            seed + run as u64,
            false,
        )
        .map(|(summary, _)| summary)
    };
    let idle = measure(4_000)?;
    let load = file.start(mb_per_s);
    let during_file = measure(5_000);
    let achieved_mb_per_s = load.stop()?;
    let file = during_file?;
    let busy = disk_control::CpuLoad::start();
    let during_cpu = measure(6_000);
    busy.stop()?;
    let cpu = during_cpu?;
    // The WAL sessions commit asynchronously, as our backfill's does.
    let wal_session = || -> Result<Db> {
        let mut session = cluster.connect(&name)?;
        session
            .client()
            .batch_execute("SET synchronous_commit = off")?;
        Ok(session)
    };
    let bursts = disk_control::wal_load(wal_session()?, mb_per_s);
    let during_wal = measure(7_000);
    let achieved_wal_mb_per_s = bursts.stop()?;
    let wal = during_wal?;
    let stream = disk_control::wal_stream_load(wal_session()?, mb_per_s);
    let during_stream = measure(8_000);
    let achieved_wal_stream_mb_per_s = stream.stop()?;
    let wal_stream = during_stream?;
    let stream = disk_control::wal_stream_load(wal_session()?, mb_per_s);
    let busy = disk_control::CpuLoad::start();
    let during_both = measure(9_000);
    busy.stop()?;
    let achieved_cpu_and_wal_stream_mb_per_s = stream.stop()?;
    let cpu_and_wal_stream = during_both?;
    let memory_load = disk_control::memory_load(None);
    let during_memory = measure(11_000);
    let memory_mb_per_s = memory_load.stop()?;
    let memory = during_memory?;
    let stream = disk_control::wal_stream_load(wal_session()?, mb_per_s);
    let memory_load = disk_control::memory_load(None);
    let during_memory_and_stream = measure(12_000);
    memory_load.stop()?;
    let achieved_memory_and_wal_stream_mb_per_s = stream.stop()?;
    let memory_and_wal_stream = during_memory_and_stream?;
    let mut memory_paced = Vec::new();
    for (i, &rate) in args.memory_rates.iter().enumerate() {
        let memory_load = disk_control::memory_load(Some(rate));
        let during = measure(13_000 + 100 * i as u64);
        let achieved_mb_per_s = memory_load.stop()?;
        let writer = during?;
        let stream = disk_control::wal_stream_load(wal_session()?, mb_per_s);
        let memory_load = disk_control::memory_load(Some(rate));
        let during = measure(13_050 + 100 * i as u64);
        memory_load.stop()?;
        let achieved_wal_stream_mb_per_s = stream.stop()?;
        memory_paced.push(PacedMemory {
            mb_per_s: rate,
            achieved_mb_per_s,
            writer,
            with_wal_stream: during?,
            achieved_wal_stream_mb_per_s,
        });
    }
    // Our backfill itself, in another database of the cluster: the same server work, WAL,
    // buffer pool and disk as next to the writer, but none of the pages, rows or locks
    // the writer touches.
    let other_name = format!("{name}_other");
    let mut other = clone_db(cluster, TEMPLATE, &other_name)?;
    let w = start_writer(cluster, &name, args.writer_pause_ms, 10_000 + run as u64);
    let elsewhere = measure_backfill(
        cluster,
        &mut other,
        "per-page, another database",
        false,
        args.writer_horizon_ms,
        |db| {
            let note = ours(db, StrategyChoice::PerPage, args);
            w.signal_stop();
            note
        },
    );
    let ours_elsewhere = stop_writer(w, &mut db)?;
    let ours_elsewhere_backfill = elsewhere?;
    drop(other);
    drop_db(cluster, &other_name)?;
    drop(db);
    drop_db(cluster, &name)?;
    say(&format!(
        "  p99 alone {:.2} ms, next to the file ({achieved_mb_per_s:.1} MB/s) {:.2} ms, next to a busy CPU {:.2} ms, next to WAL in bursts ({achieved_wal_mb_per_s:.1} MB/s) {:.2} ms, streamed ({achieved_wal_stream_mb_per_s:.1} MB/s) {:.2} ms, streamed next to a busy CPU ({achieved_cpu_and_wal_stream_mb_per_s:.1} MB/s) {:.2} ms, next to the memory thread ({memory_mb_per_s:.0} MB/s) {:.2} ms, it and the stream ({achieved_memory_and_wal_stream_mb_per_s:.1} MB/s) {:.2} ms, next to ours in another database ({:.1} s, {:.1} MB/s of WAL) {:.2} ms",
        idle.p99_ms,
        file.p99_ms,
        cpu.p99_ms,
        wal.p99_ms,
        wal_stream.p99_ms,
        cpu_and_wal_stream.p99_ms,
        memory.p99_ms,
        memory_and_wal_stream.p99_ms,
        ours_elsewhere_backfill.seconds,
        ours_elsewhere_backfill.wal_mb_per_s(),
        ours_elsewhere.p99_ms
    ));
    Ok(DiskControlRun {
        mb_per_s,
        rate_source: rate_source.to_owned(),
        achieved_mb_per_s,
        idle,
        file,
        cpu,
        wal,
        achieved_wal_mb_per_s,
        wal_stream,
        achieved_wal_stream_mb_per_s,
        cpu_and_wal_stream,
        achieved_cpu_and_wal_stream_mb_per_s,
        memory,
        memory_mb_per_s,
        memory_and_wal_stream,
        achieved_memory_and_wal_stream_mb_per_s,
        memory_paced,
        ours_elsewhere,
        ours_elsewhere_backfill,
    })
}

/// The real binary next to this one. Under `cargo run` it is (re)built first, so that
/// what is measured is the current source.
fn hydra_upgrade_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let dir = exe.parent().context("the bench binary has a directory")?;
    let bin = dir.join("hydra-upgrade");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = Cmd::new(cargo).args(["build", "--bin", "hydra-upgrade"]);
        if dir.ends_with("release") {
            cmd = cmd.arg("--release");
        }
        if let Err(e) = cmd.run() {
            say(&format!(
                "warning: building hydra-upgrade failed, measuring the binary already there: {e:#}"
            ));
        }
    }
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release --bin hydra-upgrade`",
            bin.display()
        );
    }
    Ok(bin)
}

fn time_binary() -> Option<&'static Path> {
    let p = Path::new("/usr/bin/time");
    p.is_file().then_some(p)
}

/// Run `hydra-upgrade backfill` on a fresh copy under `/usr/bin/time -v`: its max RSS.
fn run_memory(cluster: &PgCluster, args: &BenchArgs) -> Result<Option<MemoryRun>> {
    let Some(time) = time_binary() else {
        say(
            "warning: /usr/bin/time is not installed (apt-get install time); peak memory not measured",
        );
        return Ok(None);
    };
    let bin = hydra_upgrade_binary()?;
    let name = "bench_memory";
    drop(clone_db(cluster, TEMPLATE, name)?);
    let dsn = cluster.dsn_string(name, SUPERUSER);
    let knobs = [
        "--strategy".to_owned(),
        "per-page".to_owned(),
        "--target-batch-ms".to_owned(),
        args.target_batch_ms.to_string(),
        "--pause-ms".to_owned(),
        args.pause_ms.to_string(),
        "--pin-cpu".to_owned(),
        args.pin_cpu.to_string(),
    ];
    let cmd = Cmd::new(time)
        .arg("-v")
        .arg(&bin)
        .args(["--db", &dsn, "backfill"])
        .args(&knobs);
    say(&format!("peak memory: {}", cmd.display()));
    let t0 = Instant::now();
    let out = cmd.run()?;
    let seconds = t0.elapsed().as_secs_f64();
    let kb: f64 = out
        .stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes):")
                .and_then(|v| v.trim().parse().ok())
        })
        .context("no `Maximum resident set size` in the output of /usr/bin/time -v")?;
    let mut db = cluster.connect(name)?;
    let left = rows_left(&mut db)?;
    drop(db);
    drop_db(cluster, name)?;
    if left != 0 {
        bail!("hydra-upgrade backfill left {left} NULL rows");
    }
    let command = format!(
        "/usr/bin/time -v hydra-upgrade --db '<{name}>' backfill {}",
        knobs.join(" ")
    );
    say(&format!("  max RSS {:.1} MB in {seconds:.1}s", kb / 1024.0));
    Ok(Some(MemoryRun {
        command,
        max_rss_mb: kb / 1024.0,
        seconds,
    }))
}

fn build_templates(cluster: &PgCluster, args: &BenchArgs, filled: bool) -> Result<Template> {
    let spec = spec(args);
    say(&format!(
        "building the template: synthetic Hydra at schema 57 ({} projects, {} jobsets, {} jobs, {} builds), then upgrade-58..61",
        spec.projects, spec.jobsets, spec.jobs, spec.builds
    ));
    let t0 = Instant::now();
    cluster.create_database(TEMPLATE, None)?;
    let mut db = cluster.connect(TEMPLATE)?;
    synth::generate(&mut db, &spec)?;
    hydra_schema::apply_steps(&mut db, hydra_schema::MIGRATION_VERSION)?;
    // As a long-running Hydra's tables are: vacuumed, analyzed, visibility map set.
    db.client().batch_execute("VACUUM ANALYZE")?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let r = db.client().query_one(
        "SELECT (SELECT count(*) FROM builds), (SELECT count(*) FROM jobs),
                pg_relation_size('builds') / current_setting('block_size')::bigint,
                pg_total_relation_size('builds')",
        &[],
    )?;
    let template = Template {
        builds: r.get(0),
        jobs: r.get(1),
        builds_heap_pages: r.get(2),
        builds_bytes: r.get(3),
        load_seconds,
    };
    drop(db);
    say(&format!(
        "  template: {} builds, {} jobs, {} heap pages, {:.1} MB, in {:.1}s",
        template.builds,
        template.jobs,
        template.builds_heap_pages,
        mb(template.builds_bytes),
        load_seconds
    ));
    if filled {
        // The final-phase contenders start from a completed backfill (ours, as an admin
        // using this tool would have), vacuumed; the tool's progress table removed.
        say("building the filled template for the final phase (our per-page backfill, VACUUM)");
        cluster.create_database(TEMPLATE_FILLED, Some(TEMPLATE))?;
        let mut db = cluster.connect(TEMPLATE_FILLED)?;
        ours(&mut db, StrategyChoice::PerPage, args)?;
        drop(db);
        let mut db = cluster.connect(TEMPLATE_FILLED)?;
        backfill::state::drop_all(&mut db)?;
        db.client().batch_execute("VACUUM ANALYZE")?;
        if rows_left(&mut db)? != 0 {
            bail!("the filled template still has NULL jobset_id rows");
        }
    }
    Ok(template)
}

pub fn spec(args: &BenchArgs) -> synth::Spec {
    synth::Spec {
        projects: args.projects,
        jobsets: args.jobsets,
        jobs: args.jobs,
        builds: args.builds,
        seed: args.seed,
    }
}

pub fn run(args: &BenchArgs) -> Result<Bench> {
    for c in &args.contenders {
        if !ALL_CONTENDERS.contains(&c.as_str()) {
            bail!(
                "unknown contender {c:?}; known: {}",
                ALL_CONTENDERS.join(", ")
            );
        }
    }
    if let Some(r) = args
        .memory_rates
        .iter()
        .find(|r| !(r.is_finite() && **r > 0.0))
    {
        bail!("--memory-rates takes rates above 0 MB/s, not {r}");
    }
    let wants = |c: &str| args.contenders.iter().any(|x| x == c);
    if (args.quiet_wal || args.prepare_wal || args.warm_copy || args.template_out_of_cache)
        && (!wants("writer") || args.skip_writer)
    {
        bail!(
            "--quiet-wal, --prepare-wal, --warm-copy and --template-out-of-cache act before \
             the writer's runs: add writer to --contenders, without --skip-writer"
        );
    }
    if args.alternate().is_some() && (!wants("writer") || args.skip_writer || args.runs < 2) {
        bail!(
            "--alternate-pg-setting, --alternate-pause-ms, --alternate-target-batch-ms, \
             --alternate-warm-copy and --alternate-template-out-of-cache act on every second \
             writer run: add writer to --contenders, without --skip-writer, and give --runs 2 \
             or more"
        );
    }
    if !args.memory_rates.is_empty() && (!wants("disk-control") || args.skip_writer) {
        bail!(
            "--memory-rates adds rows to disk-control: add it to --contenders, without --skip-writer"
        );
    }
    let backfill_list: Vec<&str> = ["offline", "stock", "per-page", "keyset"]
        .into_iter()
        .filter(|c| wants(c))
        .collect();
    let final_list: Vec<&str> = ["final-stock", "final-ours"]
        .into_iter()
        .filter(|c| wants(c))
        .collect();

    say("starting a throwaway PostgreSQL");
    let mut settings: Vec<&str> = SETTINGS.to_vec();
    settings.extend(args.pg_setting.iter().map(String::as_str));
    let cluster = match &args.wal_dir {
        Some(dir) => PgCluster::start_with_wal_in(dir, &settings)?,
        None => PgCluster::start(&settings)?,
    }
    .share_until_exit(std::process::id())?;
    let mut postgres = cluster.connect("postgres")?;
    let machine = machine(cluster, &mut postgres, &args.pg_setting)?;
    // A mistyped `--ours-setting` fails here, not after the template (14 minutes at 10M).
    for setting in &args.ours_setting {
        set_for_session(&mut postgres, setting)
            .context("checking --ours-setting before building the template")?;
    }
    drop(postgres);
    if !args.alternate_pg_setting.is_empty() {
        let before = alternate_set(cluster, &args.alternate_pg_setting)
            .context("checking --alternate-pg-setting before building the template")?;
        alternate_reset(cluster, &before)?;
    }
    if args.warm_copy || args.alternate_warm_copy {
        page_cache::warm(&mut cluster.connect("postgres")?)
            .context("checking --warm-copy before building the template")?;
    }
    if args.perf_profile.is_some() {
        perf_profile::check(&cluster.socket_dir().join("bench-perf-check.data"))?;
    }
    if args.disk_write_trace {
        disk_write_trace::check(&cluster.data())?;
    }
    // The memory contender runs the real binary last: a bench binary copied elsewhere
    // without it once failed there, after 25 minutes at 1M.
    if wants("memory") && time_binary().is_some() {
        hydra_upgrade_binary()
            .context("checking the memory contender's binary before building the template")?;
    }
    say(&format!(
        "{} CPUs, {:.1} GiB; {}",
        machine.cpus, machine.memory_gib, machine.postgres
    ));
    let template = build_templates(cluster, args, !final_list.is_empty())?;

    let runs_n = args.runs.max(1);
    let mut runs = Vec::new();
    for run in 0..runs_n {
        let mut order_b = backfill_list.clone();
        let mut order_f = final_list.clone();
        if !run.is_multiple_of(2) {
            order_b.reverse();
            order_f.reverse();
        }
        let mut backfill_runs = Vec::new();
        for c in &order_b {
            backfill_runs.push(run_backfill_contender(cluster, c, run, args)?);
        }
        let mut final_runs = Vec::new();
        for c in &order_f {
            final_runs.push(run_final_contender(cluster, c, run, args)?);
        }
        let writer = if wants("writer") && !args.skip_writer {
            Some(run_writer(cluster, run, args)?)
        } else {
            None
        };
        let disk_control = if wants("disk-control") && !args.skip_writer {
            let ours = writer
                .as_ref()
                .map(|w| (&w.backfill, "the WAL rate of ours next to the writer"))
                .or_else(|| {
                    backfill_runs
                        .iter()
                        .find(|b| b.contender == "per-page")
                        .map(|b| (b, "the WAL rate of ours, per-page"))
                });
            let (rate, source) = match (args.disk_mb_per_s, ours) {
                (Some(r), _) => (r, "--disk-mb-per-s"),
                (None, Some((b, source))) => (b.wal_mb_per_s(), source),
                (None, None) => (50.0, "a fixed 50 MB/s: ours did not run"),
            };
            Some(run_disk_control(cluster, run, args, rate, source)?)
        } else {
            None
        };
        runs.push(Run {
            order: order_b
                .iter()
                .chain(&order_f)
                .map(|s| s.to_string())
                .collect(),
            backfill: backfill_runs,
            final_phase: final_runs,
            writer,
            disk_control,
        });
    }
    let memory = if wants("memory") {
        run_memory(cluster, args)?
    } else {
        None
    };
    let medians = medians(&runs, &backfill_list, &final_list);
    let ours = ours_options(StrategyChoice::PerPage, args);
    let mut bench = Bench {
        spec: spec(args),
        runs_requested: runs_n,
        writer_pause_ms: args.writer_pause_ms,
        writer_secs: args.writer_secs,
        control_secs: args.control_secs,
        ours_target_batch_ms: args.target_batch_ms,
        ours_pause_ms: args.pause_ms,
        ours_max_batch: ours.max_batch,
        ours_pin_cpu: ours.pin_cpu.to_string(),
        ours_slice_ms: args.slice_ours,
        writer_horizon_ms: args.writer_horizon_ms,
        ours_nice: args.nice_ours,
        walwriter_nice: args.nice_walwriter,
        walwriter_cpus: args.walwriter_cpus.clone(),
        ours_pinned: args.pin_ours,
        ours_sched_idle: args.idle_ours,
        ours_idle_group: args.idle_group_ours,
        ours_settings: args.ours_setting.clone(),
        alternate: args.alternate(),
        machine,
        template,
        runs,
        memory,
        medians,
        table: String::new(),
    };
    bench.table = render(&bench);
    Ok(bench)
}

/// The medians of a set of writer runs (`None` for none).
fn median_writer_run(writer_runs: &[&WriterRun]) -> Option<WriterRun> {
    (!writer_runs.is_empty()).then(|| WriterRun {
        idle: median_writer(&writer_runs.iter().map(|w| &w.idle).collect::<Vec<_>>()),
        during: median_writer(&writer_runs.iter().map(|w| &w.during).collect::<Vec<_>>()),
        backfill: median_backfill(
            &writer_runs[0].backfill.contender,
            &writer_runs.iter().map(|w| &w.backfill).collect::<Vec<_>>(),
        ),
        wal_trace: median_wal_trace(writer_runs.iter().filter_map(|w| w.wal_trace.as_ref())),
        walwriter: {
            let cpu: Vec<ProcessCpu> = writer_runs.iter().filter_map(|w| w.walwriter).collect();
            (!cpu.is_empty()).then(|| ProcessCpu {
                on_cpu_ms: median(cpu.iter().map(|c| c.on_cpu_ms).collect()),
                cpu_wait_ms: median(cpu.iter().map(|c| c.cpu_wait_ms).collect()),
            })
        },
        wal_segments_ahead: median_i(writer_runs.iter().map(|w| w.wal_segments_ahead).collect()),
        quiet_wal: median_pair(writer_runs.iter().map(|w| w.quiet_wal)),
        warmed: {
            let warmed: Vec<page_cache::Warmed> =
                writer_runs.iter().filter_map(|w| w.warmed).collect();
            (!warmed.is_empty()).then(|| page_cache::Warmed {
                mb: median(warmed.iter().map(|w| w.mb).collect()),
                seconds: median(warmed.iter().map(|w| w.seconds).collect()),
                huge_mb: median(warmed.iter().map(|w| w.huge_mb).collect()),
            })
        },
        template_evicted: {
            let evicted: Vec<page_cache::Evicted> = writer_runs
                .iter()
                .filter_map(|w| w.template_evicted)
                .collect();
            (!evicted.is_empty()).then(|| page_cache::Evicted {
                files: evicted[0].files,
                mb: median(evicted.iter().map(|e| e.mb).collect()),
                released_mb: median(evicted.iter().map(|e| e.released_mb).collect()),
            })
        },
        prepared_wal: median_pair(writer_runs.iter().map(|w| w.prepared_wal)),
        during_prepare: {
            let during: Vec<&WriterSummary> = writer_runs
                .iter()
                .filter_map(|w| w.during_prepare.as_ref())
                .collect();
            (!during.is_empty()).then(|| median_writer(&during))
        },
        alternate: writer_runs[0].alternate,
        // Per run only (see render_writer): a median of thread lists would mix runs.
        cpu_census: None,
        perf_profile: None,
        disk_writes: None,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Each half's median, when every run has the pair.
fn median_pair(pairs: impl Iterator<Item = Option<(i64, i64)>>) -> Option<(i64, i64)> {
    let pairs: Vec<(i64, i64)> = pairs.collect::<Option<_>>()?;
    (!pairs.is_empty()).then(|| {
        (
            median_i(pairs.iter().map(|p| p.0).collect()),
            median_i(pairs.iter().map(|p| p.1).collect()),
        )
    })
}

fn median_i(v: Vec<i64>) -> i64 {
    median(v.into_iter().map(|x| x as f64).collect()).round() as i64
}

fn median_backfill(name: &str, rs: &[&BackfillRun]) -> BackfillRun {
    BackfillRun {
        contender: name.to_owned(),
        seconds: median(rs.iter().map(|r| r.seconds).collect()),
        builds_updates: median_i(rs.iter().map(|r| r.builds_updates).collect()),
        builds_hot_updates: median_i(rs.iter().map(|r| r.builds_hot_updates).collect()),
        hot_share: median(rs.iter().map(|r| r.hot_share).collect()),
        bytes_before: median_i(rs.iter().map(|r| r.bytes_before).collect()),
        bytes_after: median_i(rs.iter().map(|r| r.bytes_after).collect()),
        rows_left: rs.iter().map(|r| r.rows_left).max().unwrap_or(0),
        note: rs.first().map(|r| r.note.clone()).unwrap_or_default(),
        autovacuums: median_i(rs.iter().map(|r| r.autovacuums).collect()),
        autoanalyzes: median_i(rs.iter().map(|r| r.autoanalyzes).collect()),
        wal_bytes: median_i(rs.iter().map(|r| r.wal_bytes).collect()),
        // The first run's.
        wal_kinds: rs
            .iter()
            .map(|r| r.wal_kinds.clone())
            .find(|k| !k.is_empty())
            .unwrap_or_default(),
        // Summed over the runs.
        horizon_holders: {
            let mut all: std::collections::BTreeMap<String, u64> = Default::default();
            for r in rs {
                for (k, n) in &r.horizon_holders {
                    *all.entry(k.clone()).or_default() += n;
                }
            }
            all.into_iter().collect()
        },
        horizon_every_ms: rs.first().map_or(0, |r| r.horizon_every_ms),
    }
}

/// Each figure's median over the runs that traced the WAL (counts rounded down; the wait
/// event samples summed).
fn median_wal_trace<'a>(
    runs: impl Iterator<Item = &'a wal_trace::WalTrace>,
) -> Option<wal_trace::WalTrace> {
    let runs: Vec<&wal_trace::WalTrace> = runs.collect();
    if runs.is_empty() {
        return None;
    }
    let m = |f: fn(&wal_trace::WalTrace) -> f64| median(runs.iter().map(|t| f(t)).collect());
    Some(wal_trace::WalTrace {
        threshold_ms: m(|t| t.threshold_ms),
        slow_ops: m(|t| t.slow_ops as f64) as usize,
        other_ops: m(|t| t.other_ops as f64) as usize,
        slow_median_kb: m(|t| t.slow_median_kb),
        other_median_kb: m(|t| t.other_median_kb),
        other_p90_kb: m(|t| t.other_p90_kb),
        slow_above_other_p90: m(|t| t.slow_above_other_p90 as f64) as usize,
        slow_backlog_median_kb: m(|t| t.slow_backlog_median_kb),
        other_backlog_median_kb: m(|t| t.other_backlog_median_kb),
        slow_waits: summed(runs.iter().map(|t| &t.slow_waits)),
        other_waits: summed(runs.iter().map(|t| &t.other_waits)),
        slow_ours_waits: summed(runs.iter().map(|t| &t.slow_ours_waits)),
        other_ours_waits: summed(runs.iter().map(|t| &t.other_ours_waits)),
        slow_segment_ends: m(|t| t.slow_segment_ends as f64) as usize,
        other_segment_ends: m(|t| t.other_segment_ends as f64) as usize,
    })
}

fn summed<'a>(lists: impl Iterator<Item = &'a Vec<(String, usize)>>) -> Vec<(String, usize)> {
    wal_trace::tally(
        lists
            .flat_map(|l| l.iter())
            .flat_map(|(label, n)| std::iter::repeat_n(label.as_str(), *n)),
    )
}

fn median_writer(rs: &[&WriterSummary]) -> WriterSummary {
    WriterSummary {
        seconds: median(rs.iter().map(|r| r.seconds).collect()),
        ops: median(rs.iter().map(|r| r.ops as f64).collect()) as u64,
        p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
        insert_p99_ms: median(rs.iter().map(|r| r.insert_p99_ms).collect()),
        finish_p99_ms: median(rs.iter().map(|r| r.finish_p99_ms).collect()),
        max_ms: median(rs.iter().map(|r| r.max_ms).collect()),
        // Errors and lost updates: the worst run, not the median.
        errors: rs.iter().map(|r| r.errors).max().unwrap_or(0),
        error_samples: rs
            .iter()
            .flat_map(|r| r.error_samples.clone())
            .take(5)
            .collect(),
        lost_updates: rs.iter().map(|r| r.lost_updates).max().unwrap_or(0),
        over_10ms: median(rs.iter().map(|r| r.over_10ms as f64).collect()) as u64,
        over_100ms: median(rs.iter().map(|r| r.over_100ms as f64).collect()) as u64,
        cpu_wait_p99_ms: median_of_measured(rs.iter().map(|r| r.cpu_wait_p99_ms)),
        p99_without_cpu_waits_ms: median_of_measured(rs.iter().map(|r| r.p99_without_cpu_waits_ms)),
        latencies_ms: rs.iter().flat_map(|r| r.latencies_ms.clone()).collect(),
    }
}

/// The median of the runs that measured a figure; `None` when none did.
fn median_of_measured(xs: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let measured: Vec<f64> = xs.flatten().collect();
    (!measured.is_empty()).then(|| median(measured))
}

fn medians(runs: &[Run], backfill_list: &[&str], final_list: &[&str]) -> Medians {
    let backfill = backfill_list
        .iter()
        .map(|c| {
            let rs: Vec<&BackfillRun> = runs
                .iter()
                .flat_map(|r| r.backfill.iter().filter(|b| b.contender == *c))
                .collect();
            median_backfill(c, &rs)
        })
        .collect();
    let final_phase = final_list
        .iter()
        .map(|c| {
            let rs: Vec<&FinalRun> = runs
                .iter()
                .flat_map(|r| r.final_phase.iter().filter(|f| f.contender == *c))
                .collect();
            // Per-step medians, in the first run's step order.
            let steps = |online: bool| -> Vec<(String, f64)> {
                let first = rs.first().map(|f| {
                    if online {
                        &f.online_steps
                    } else {
                        &f.blocking_steps
                    }
                });
                first
                    .map(|s0| {
                        s0.iter()
                            .map(|(name, _)| {
                                let v = rs
                                    .iter()
                                    .filter_map(|f| {
                                        let list = if online {
                                            &f.online_steps
                                        } else {
                                            &f.blocking_steps
                                        };
                                        list.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
                                    })
                                    .collect();
                                (name.clone(), median(v))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let blocking_steps = steps(false);
            let (longest_block_step, _) = blocking_steps
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .cloned()
                .unwrap_or_default();
            let writers: Vec<&WriterSummary> =
                rs.iter().filter_map(|f| f.writer.as_ref()).collect();
            FinalRun {
                contender: c.to_string(),
                seconds: median(rs.iter().map(|f| f.seconds).collect()),
                online_steps: steps(true),
                blocking_steps,
                longest_block: median(rs.iter().map(|f| f.longest_block).collect()),
                longest_block_step,
                writer: (!writers.is_empty()).then(|| median_writer(&writers)),
                slowest_writer_ops: {
                    let mut ops: Vec<SlowOp> = rs
                        .iter()
                        .flat_map(|f| f.slowest_writer_ops.iter().cloned())
                        .collect();
                    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
                    ops.truncate(SLOWEST_OPS);
                    ops
                },
            }
        })
        .collect();
    let writer_group = |alternate: bool| -> Option<WriterRun> {
        let writer_runs: Vec<&WriterRun> = runs
            .iter()
            .filter_map(|r| r.writer.as_ref())
            .filter(|w| w.alternate == alternate)
            .collect();
        median_writer_run(&writer_runs)
    };
    let writer = writer_group(false);
    let writer_alternate = writer_group(true);
    let disk_runs: Vec<&DiskControlRun> = runs
        .iter()
        .filter_map(|r| r.disk_control.as_ref())
        .collect();
    let rate = |f: fn(&DiskControlRun) -> f64| median(disk_runs.iter().map(|d| f(d)).collect());
    let summary = |f: fn(&DiskControlRun) -> &WriterSummary| {
        median_writer(&disk_runs.iter().map(|d| f(d)).collect::<Vec<_>>())
    };
    let disk_control = (!disk_runs.is_empty()).then(|| DiskControlRun {
        mb_per_s: rate(|d| d.mb_per_s),
        rate_source: disk_runs[0].rate_source.clone(),
        achieved_mb_per_s: rate(|d| d.achieved_mb_per_s),
        idle: summary(|d| &d.idle),
        file: summary(|d| &d.file),
        cpu: summary(|d| &d.cpu),
        wal: summary(|d| &d.wal),
        achieved_wal_mb_per_s: rate(|d| d.achieved_wal_mb_per_s),
        wal_stream: summary(|d| &d.wal_stream),
        achieved_wal_stream_mb_per_s: rate(|d| d.achieved_wal_stream_mb_per_s),
        cpu_and_wal_stream: summary(|d| &d.cpu_and_wal_stream),
        achieved_cpu_and_wal_stream_mb_per_s: rate(|d| d.achieved_cpu_and_wal_stream_mb_per_s),
        memory: summary(|d| &d.memory),
        memory_mb_per_s: rate(|d| d.memory_mb_per_s),
        memory_and_wal_stream: summary(|d| &d.memory_and_wal_stream),
        achieved_memory_and_wal_stream_mb_per_s: rate(|d| {
            d.achieved_memory_and_wal_stream_mb_per_s
        }),
        memory_paced: (0..disk_runs[0].memory_paced.len())
            .map(|i| {
                let at: Vec<&PacedMemory> = disk_runs.iter().map(|d| &d.memory_paced[i]).collect();
                PacedMemory {
                    mb_per_s: at[0].mb_per_s,
                    achieved_mb_per_s: median(at.iter().map(|p| p.achieved_mb_per_s).collect()),
                    writer: median_writer(&at.iter().map(|p| &p.writer).collect::<Vec<_>>()),
                    with_wal_stream: median_writer(
                        &at.iter().map(|p| &p.with_wal_stream).collect::<Vec<_>>(),
                    ),
                    achieved_wal_stream_mb_per_s: median(
                        at.iter().map(|p| p.achieved_wal_stream_mb_per_s).collect(),
                    ),
                }
            })
            .collect(),
        ours_elsewhere: summary(|d| &d.ours_elsewhere),
        ours_elsewhere_backfill: median_backfill(
            "per-page, another database",
            &disk_runs
                .iter()
                .map(|d| &d.ours_elsewhere_backfill)
                .collect::<Vec<_>>(),
        ),
    });
    Medians {
        backfill,
        final_phase,
        writer,
        writer_alternate,
        disk_control,
    }
}

/// Bytes in MB (MiB, as everywhere in the bench).
pub fn mb(bytes: i64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn label(contender: &str) -> &'static str {
    match contender {
        "offline" => "offline UPDATE ... FROM jobsets",
        "stock" => "stock hydra-backfill-ids",
        "per-page" => "ours, per-page",
        "keyset" => "ours, keyset",
        "per-page + writer" => "ours, per-page, writer running",
        "per-page + writer, alternate" => "ours, per-page, writer, alternate",
        "final-stock" => "stock: hydra-init 62..65",
        "final-ours" => "ours: hydra-upgrade finalize",
        _ => "?",
    }
}

/// What the writer tables' last two columns are, printed once under the first of them.
const CPU_WAIT_LEGEND: &str = "  (cpu wait: p99 of the time an operation's server process and client thread were runnable but waited for a CPU; p99 -cpu: the p99 had no operation waited so)";

/// The writer table: a header, then one row per measurement (no trailing newline).
fn writer_rows(header: &str, rows: &[(String, &WriterSummary)]) -> String {
    let mut lines = vec![format!(
        "{:<34} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>7} {:>7} {:>9} {:>9}",
        header,
        "ops",
        "secs",
        "p50 ms",
        "p99 ms",
        "ins. p99",
        "fin. p99",
        "max ms",
        "errors",
        "lost",
        ">10ms",
        ">100ms",
        "cpu wait",
        "p99 -cpu"
    )];
    for (name, x) in rows {
        lines.push(format!(
            "{:<34} {:>6} {:>7.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7} {:>6} {:>7} {:>7} {:>9} {:>9}",
            name,
            x.ops,
            x.seconds,
            x.p50_ms,
            x.p99_ms,
            x.insert_p99_ms,
            x.finish_p99_ms,
            x.max_ms,
            x.errors,
            x.lost_updates,
            x.over_10ms,
            x.over_100ms,
            ms_or_dash(x.cpu_wait_p99_ms),
            ms_or_dash(x.p99_without_cpu_waits_ms)
        ));
    }
    lines.join("\n")
}

/// How many of the busiest names a `--cpu-census` line shows before summing the rest.
const CENSUS_TOP: usize = 10;

/// The writer's block of the table: medians `w` over the runs `group`.
fn render_writer(s: &mut String, b: &Bench, w: &WriterRun, group: &[&WriterRun]) {
    let push = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    push(
        s,
        writer_rows(
            &format!("writer ({} ms pause between ops)", b.writer_pause_ms),
            &[
                (format!("alone, {} s", b.writer_secs), &w.idle),
                ("during ours, per-page".to_owned(), &w.during),
            ]
            .into_iter()
            .chain(
                w.during_prepare
                    .as_ref()
                    .map(|p| ("during wal prepare, before".to_owned(), p)),
            )
            .collect::<Vec<_>>(),
        ),
    );
    push(
        s,
        format!(
            "p99 during / alone: {:.2}\n{CPU_WAIT_LEGEND}",
            w.during.p99_over(&w.idle)
        ),
    );
    if group.len() > 1 {
        // With a few hundred operations a run (100k builds) a run's p99 is its second
        // or third slowest operation, and a median of three of them swings by more
        // than the effects measured; all runs' operations together are a steadier
        // reading of the same percentile. Shown beside the medians, not instead.
        let pooled = |w: &WriterSummary| workload::percentile(w.latencies_ms.clone(), 99.0);
        let (idle, during) = (pooled(&w.idle), pooled(&w.during));
        push(
            s,
            format!(
                "  all {} runs' operations pooled ({} alone, {} during): p99 {:.2} -> {:.2} ms, {:.2} x",
                group.len(),
                w.idle.latencies_ms.len(),
                w.during.latencies_ms.len(),
                idle,
                during,
                during / idle.max(1e-9)
            ),
        );
    }
    if group.len() > 1 {
        let per_run: Vec<String> = group
            .iter()
            .map(|r| {
                format!(
                    "{:.2} -> {:.2} ({:.2} x; {} over 10 ms; {:.1} s, {:.0} MB of WAL)",
                    r.idle.p99_ms,
                    r.during.p99_ms,
                    r.during.p99_over(&r.idle),
                    r.during.over_10ms,
                    r.backfill.seconds,
                    mb(r.backfill.wal_bytes)
                )
            })
            .collect();
        push(
            s,
            format!(
                "  per run, p99 alone -> during (ms): {}",
                per_run.join(", ")
            ),
        );
    }
    push(
        s,
        format!(
            "  WAL segments ready in pg_wal as ours started: {} (median){}{}",
            w.wal_segments_ahead,
            w.quiet_wal
                .map(|(before, after)| format!(
                    "; --quiet-wal had left {after} of {before} before the writer's idle run"
                ))
                .unwrap_or_default(),
            w.prepared_wal
                .map(|(before, after)| format!(
                    "; --prepare-wal (wal prepare) had brought {before} to {after}"
                ))
                .unwrap_or_default()
        ),
    );
    if let Some(c) = w.walwriter {
        let per_run: Vec<String> = group
            .iter()
            .filter_map(|r| {
                r.walwriter.map(|c| {
                    format!(
                        "{:.0}/{:.0} ({:.2} x)",
                        c.on_cpu_ms,
                        c.cpu_wait_ms,
                        r.during.p99_over(&r.idle)
                    )
                })
            })
            .collect();
        push(
            s,
            format!(
                "  the WAL writer during ours: {:.0} ms on a CPU, {:.0} ms runnable waiting for one{}",
                c.on_cpu_ms,
                c.cpu_wait_ms,
                if per_run.len() > 1 {
                    format!(
                        " (medians; per run, with the writer's p99 ratio: {})",
                        per_run.join(", ")
                    )
                } else {
                    String::new()
                }
            ),
        );
    }
    for (i, r) in group.iter().enumerate() {
        if let Some((idle, during)) = &r.cpu_census {
            push(
                s,
                format!(
                    "  CPU (--cpu-census), this block's run {} ({:.2} x), in % of one CPU:\n    alone:  {}\n    during: {}",
                    i + 1,
                    r.during.p99_over(&r.idle),
                    idle.describe(CENSUS_TOP),
                    during.describe(CENSUS_TOP)
                ),
            );
        }
    }
    for (i, r) in group.iter().enumerate() {
        if let Some(p) = &r.perf_profile {
            let names: Vec<String> = p.pids.iter().map(|(pid, n)| format!("{pid} {n}")).collect();
            push(
                s,
                format!(
                    "  perf (--perf-profile), this block's run {} ({:.2} x), share of all CPUs' samples; the cluster's pids: {}\n    {}",
                    i + 1,
                    r.during.p99_over(&r.idle),
                    names.join(", "),
                    p.lines.join("\n    ")
                ),
            );
        }
    }
    for (i, r) in group.iter().enumerate() {
        if let Some(t) = &r.disk_writes {
            push(
                s,
                format!(
                    "  disk writes during the walk (--disk-write-trace), this block's run {} ({:.2} x): {}",
                    i + 1,
                    r.during.p99_over(&r.idle),
                    t.describe()
                ),
            );
        }
    }
    if let Some(t) = &w.wal_trace {
        push(
            s,
            format!(
                "WAL (--wal-trace), kB inserted while an operation ran / unflushed at its start, medians (slow: over 2 x the idle p99):\n{}",
                t.describe()
            ),
        );
        for (whose, which, waits) in [
            ("the writer's backend", "slow", &t.slow_waits),
            ("the writer's backend", "other", &t.other_waits),
            ("other sessions (ours)", "slow", &t.slow_ours_waits),
            ("other sessions (ours)", "other", &t.other_ours_waits),
        ] {
            let total: usize = waits.iter().map(|(_, n)| n).sum();
            let top: Vec<String> = waits
                .iter()
                .take(5)
                .map(|(l, n)| format!("{l} {:.0} %", 100.0 * *n as f64 / total.max(1) as f64))
                .collect();
            push(
                s,
                format!(
                    "  {whose} while {which} operations ran ({total} samples): {}",
                    top.join(", ")
                ),
            );
        }
    }
    s.push('\n');
}

fn ms_or_dash(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.2}"))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// The one table, as printed and as stored in the JSON.
pub fn render(b: &Bench) -> String {
    let m = &b.medians;
    let mut s = String::new();
    let push = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    push(
        &mut s,
        format!(
            "hydra-upgrade bench: {} builds, {} jobs, {} jobsets, {} projects (seed {}); {} run(s), medians, contender order reversed every other run",
            b.template.builds,
            b.template.jobs,
            b.spec.jobsets,
            b.spec.projects,
            b.spec.seed,
            b.runs.len()
        ),
    );
    push(
        &mut s,
        format!(
            "machine: {} CPUs ({}), {:.1} GiB RAM, {}; {}",
            b.machine.cpus,
            b.machine.cpu_model,
            b.machine.memory_gib,
            if b.machine.autogroups {
                "autogroups on (the kernel weighs sessions, not processes)"
            } else {
                "autogroups off"
            },
            b.machine.postgres
        ),
    );
    push(
        &mut s,
        format!(
            "storage: data on {}, WAL on {}",
            b.machine.data_on, b.machine.wal_on
        ),
    );
    push(
        &mut s,
        format!(
            "server: {}",
            b.machine
                .settings
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    );
    push(
        &mut s,
        format!(
            "template (schema 61, VACUUM ANALYZEd): Builds {} heap pages ({:.1} rows a page), {:.1} MB with indexes; built in {:.1}s",
            b.template.builds_heap_pages,
            b.template.builds as f64 / b.template.builds_heap_pages.max(1) as f64,
            mb(b.template.builds_bytes),
            b.template.load_seconds
        ),
    );
    push(
        &mut s,
        format!(
            "ours: CLI defaults (lock_timeout 2 s, statement_timeout 120 s), --target-batch-ms {} --pause-ms {} --max-batch-size {} --pin-cpu {}; Jobs always keyset{}{}{}{}{}{}{}{}{}",
            b.ours_target_batch_ms,
            b.ours_pause_ms,
            b.ours_max_batch,
            b.ours_pin_cpu,
            b.ours_slice_ms
                .map(|ms| format!("; its server process and client with a {ms} ms time slice"))
                .unwrap_or_default(),
            match b.writer_horizon_ms {
                HORIZON_SAMPLE_MS => String::new(),
                0 => "; no horizon sampler next to the writer".to_owned(),
                ms => format!("; the horizon sampled every {ms} ms next to the writer"),
            },
            b.ours_nice
                .map(|n| format!("; its server process at niceness {n}"))
                .unwrap_or_default(),
            b.walwriter_nice
                .map(|n| format!("; the WAL writer at niceness {n} while it runs"))
                .unwrap_or_default(),
            b.walwriter_cpus
                .as_ref()
                .map(|c| format!("; the WAL writer on CPUs {c} while it runs"))
                .unwrap_or_default(),
            if b.ours_pinned {
                "; its server process alone on CPU 0, the rest of the cluster and the writer's client on the others"
            } else {
                ""
            },
            if b.ours_sched_idle {
                "; its server process and client thread under SCHED_IDLE"
            } else {
                ""
            },
            if b.ours_idle_group {
                "; its server process and client thread in an idle CPU group"
            } else {
                ""
            },
            if b.ours_settings.is_empty() {
                String::new()
            } else {
                format!("; its session with {}", b.ours_settings.join(" "))
            }
        ),
    );
    s.push('\n');
    let offline = m
        .backfill
        .iter()
        .find(|r| r.contender == "offline")
        .map(|r| r.seconds);
    let mut brows: Vec<&BackfillRun> = m.backfill.iter().collect();
    if let Some(w) = &m.writer {
        brows.push(&w.backfill);
    }
    if let Some(w) = &m.writer_alternate {
        brows.push(&w.backfill);
    }
    if !brows.is_empty() {
        push(
            &mut s,
            format!(
                "{:<34} {:>9} {:>10} {:>8} {:>22} {:>8} {:>5} {:>8} {:>8}",
                "backfill (Jobs + Builds)",
                "time s",
                "x offline",
                "HOT",
                "Builds MB before->after",
                "growth",
                "left",
                "av/an",
                "WAL MB"
            ),
        );
        for r in &brows {
            push(
                &mut s,
                format!(
                    "{:<34} {:>9.2} {:>10} {:>7.1}% {:>10.1} -> {:>8.1} {:>+7.1}% {:>5} {:>8} {:>8.0}",
                    label(&r.contender),
                    r.seconds,
                    offline
                        .map(|o| format!("{:.2}", r.seconds / o))
                        .unwrap_or_else(|| "-".into()),
                    100.0 * r.hot_share,
                    mb(r.bytes_before),
                    mb(r.bytes_after),
                    100.0 * (r.bytes_after as f64 / r.bytes_before.max(1) as f64 - 1.0),
                    r.rows_left,
                    format!("{}/{}", r.autovacuums, r.autoanalyzes),
                    mb(r.wal_bytes)
                ),
            );
        }
        push(
            &mut s,
            "  (av/an: autovacuum/autoanalyze runs on Builds that ended during the contender; WAL: what the cluster wrote meanwhile)"
                .into(),
        );
        for r in &brows {
            if !r.wal_kinds.is_empty() {
                push(
                    &mut s,
                    format!(
                        "  {}: its WAL by kind (pg_waldump --stats, first run): {}",
                        label(&r.contender),
                        wal_volume::summary(&r.wal_kinds)
                    ),
                );
            }
        }
        for r in &brows {
            if r.contender.starts_with("per-page") && !r.horizon_holders.is_empty() {
                let list: Vec<String> = r
                    .horizon_holders
                    .iter()
                    .map(|(k, n)| format!("{k} x{n}"))
                    .collect();
                push(
                    &mut s,
                    format!(
                        "  {}: other sessions seen holding the xmin horizon (samples every {} ms, all runs): {}",
                        label(&r.contender),
                        r.horizon_every_ms,
                        list.join("; ")
                    ),
                );
            }
        }
        s.push('\n');
    }
    if !m.final_phase.is_empty() {
        push(
            &mut s,
            format!(
                "{:<34} {:>9} {:>13} {:>18} {:>7} {:>7}  {}",
                "final phase (62..65)",
                "time s",
                "longest lock s",
                "writer max lat. ms",
                "ops",
                "errors",
                "longest write-blocking step"
            ),
        );
        for f in &m.final_phase {
            let (wmax, wops, werr) = match &f.writer {
                Some(w) => (
                    format!("{:.1}", w.max_ms),
                    w.ops.to_string(),
                    w.errors.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            push(
                &mut s,
                format!(
                    "{:<34} {:>9.2} {:>13.3} {:>18} {:>7} {:>7}  {}",
                    label(&f.contender),
                    f.seconds,
                    f.longest_block,
                    wmax,
                    wops,
                    werr,
                    f.longest_block_step
                ),
            );
            let steps: Vec<String> = f
                .blocking_steps
                .iter()
                .map(|(n, t)| format!("{n} {t:.3}"))
                .collect();
            push(
                &mut s,
                format!("    write-blocking steps: {}", steps.join(", ")),
            );
            if !f.online_steps.is_empty() {
                let steps: Vec<String> = f
                    .online_steps
                    .iter()
                    .map(|(n, t)| format!("{n} {t:.3}"))
                    .collect();
                push(&mut s, format!("    online steps: {}", steps.join(", ")));
            }
            if !f.slowest_writer_ops.is_empty() {
                let ops: Vec<String> = f
                    .slowest_writer_ops
                    .iter()
                    .map(|o| {
                        let waits = |whose: &str, w: &[(String, usize)]| {
                            let list: Vec<String> =
                                w.iter().map(|(w, n)| format!("{w} x{n}")).collect();
                            if list.is_empty() {
                                String::new()
                            } else {
                                format!("; {whose}: {}", list.join(", "))
                            }
                        };
                        format!(
                            "{:.1} ms at {:+.2} s (run {}: {}{}{})",
                            o.ms,
                            o.at,
                            o.run,
                            o.during,
                            waits("the writer's backend", &o.waits),
                            waits("other sessions (ours)", &o.ours_waits)
                        )
                    })
                    .collect();
                push(
                    &mut s,
                    format!("    writer's slowest operations: {}", ops.join("; ")),
                );
            }
        }
        s.push('\n');
    }
    if let Some(w) = &m.writer {
        let group: Vec<&WriterRun> = b
            .runs
            .iter()
            .filter_map(|r| r.writer.as_ref())
            .filter(|r| !r.alternate)
            .collect();
        if b.alternate.is_some() {
            push(
                &mut s,
                "runs 1, 3, ...: as the command line says (the --alternate-* runs below)".into(),
            );
        }
        render_writer(&mut s, b, w, &group);
    }
    if let Some(w) = &m.writer_alternate {
        let group: Vec<&WriterRun> = b
            .runs
            .iter()
            .filter_map(|r| r.writer.as_ref())
            .filter(|r| r.alternate)
            .collect();
        push(
            &mut s,
            format!(
                "runs 2, 4, ...: with {}",
                b.alternate.as_deref().unwrap_or_default()
            ),
        );
        render_writer(&mut s, b, w, &group);
    }
    if let Some(d) = &m.disk_control {
        let mut rows = vec![
            (format!("alone, {} s", b.control_secs), &d.idle),
            (
                format!("next to a file, {:.1} MB/s", d.achieved_mb_per_s),
                &d.file,
            ),
            ("next to one busy CPU".to_owned(), &d.cpu),
            (
                format!("next to WAL bursts, {:.1} MB/s", d.achieved_wal_mb_per_s),
                &d.wal,
            ),
            (
                format!(
                    "next to streamed WAL, {:.1} MB/s",
                    d.achieved_wal_stream_mb_per_s
                ),
                &d.wal_stream,
            ),
            (
                format!(
                    "next to both, {:.1} MB/s",
                    d.achieved_cpu_and_wal_stream_mb_per_s
                ),
                &d.cpu_and_wal_stream,
            ),
            (
                format!("next to memory, {:.0} MB/s", d.memory_mb_per_s),
                &d.memory,
            ),
            (
                format!(
                    "memory + WAL, {:.1} MB/s",
                    d.achieved_memory_and_wal_stream_mb_per_s
                ),
                &d.memory_and_wal_stream,
            ),
        ];
        for p in &d.memory_paced {
            rows.push((
                format!("memory held to {:.0} MB/s", p.achieved_mb_per_s),
                &p.writer,
            ));
            rows.push((
                format!("  + WAL, {:.1} MB/s", p.achieved_wal_stream_mb_per_s),
                &p.with_wal_stream,
            ));
        }
        rows.push((
            format!(
                "ours in another db, {:.1} MB/s",
                d.ours_elsewhere_backfill.wal_mb_per_s()
            ),
            &d.ours_elsewhere,
        ));
        push(&mut s, writer_rows("controls (writer, no backfill)", &rows));
        let ratio = |x: &WriterSummary| x.p99_over(&d.idle);
        if !d.memory_paced.is_empty() {
            let paced: Vec<String> = d
                .memory_paced
                .iter()
                .map(|p| {
                    format!(
                        "{:.2} at {:.0} MB/s (asked {:.0}), {:.2} with the WAL stream",
                        ratio(&p.writer),
                        p.achieved_mb_per_s,
                        p.mb_per_s,
                        ratio(&p.with_wal_stream)
                    )
                })
                .collect();
            push(
                &mut s,
                format!(
                    "p99 / alone next to the memory thread held to a rate, busy in its registers in between: {}",
                    paced.join(", ")
                ),
            );
        }
        push(
            &mut s,
            format!(
                "p99 / alone: {:.2} next to the file (a file by the WAL overwritten at {:.1} MB/s, fdatasync every MB; {}), {:.2} next to one thread keeping a CPU busy, {:.2} next to a session writing as much WAL and nothing else (pg_logical_emit_message, 1 MB bursts), {:.2} next to the same WAL as a steady stream of 8 kB messages, {:.2} next to that stream and the busy thread at once, {:.2} next to a thread going through {} MiB of memory ({:.0} MB/s), {:.2} next to it and the stream at once, {:.2} next to our per-page backfill of a copy in another database of the cluster ({:.1} s)",
                ratio(&d.file),
                d.mb_per_s,
                d.rate_source,
                ratio(&d.cpu),
                ratio(&d.wal),
                ratio(&d.wal_stream),
                ratio(&d.cpu_and_wal_stream),
                ratio(&d.memory),
                disk_control::MEMORY_LOAD_MIB,
                d.memory_mb_per_s,
                ratio(&d.memory_and_wal_stream),
                ratio(&d.ours_elsewhere),
                d.ours_elsewhere_backfill.seconds
            ),
        );
        if m.writer.is_none() {
            push(&mut s, CPU_WAIT_LEGEND.into());
        }
        s.push('\n');
    }
    if let Some(mem) = &b.memory {
        push(
            &mut s,
            format!(
                "peak memory (max RSS) of `{}`: {:.1} MB ({:.1}s, one run)",
                mem.command, mem.max_rss_mb, mem.seconds
            ),
        );
        s.push('\n');
    }
    // The targets of issue 3.
    push(&mut s, "targets (issue 3)".into());
    let pp = m.backfill.iter().find(|r| r.contender == "per-page");
    if let (Some(pp), Some(o)) = (pp, offline) {
        let x = pp.seconds / o;
        push(
            &mut s,
            format!(
                "  backfill time <= 0.4 x offline UPDATE:   {:.2} x   {}",
                x,
                verdict(x <= 0.4)
            ),
        );
    }
    if let Some(pp) = pp {
        push(
            &mut s,
            format!(
                "  HOT share of Builds updates >= 90 %:     {:.1} %   {}",
                100.0 * pp.hot_share,
                verdict(pp.hot_share >= 0.9)
            ),
        );
        let g = pp.bytes_after as f64 / pp.bytes_before.max(1) as f64 - 1.0;
        push(
            &mut s,
            format!(
                "  Builds growth <= +10 %:                  {:+.1} %   {}",
                100.0 * g,
                verdict(g <= 0.10)
            ),
        );
    }
    if let Some(w) = &m.writer {
        let r = w.during.p99_over(&w.idle);
        let ok = r <= 2.0 && w.during.errors == 0 && w.during.lost_updates == 0;
        push(
            &mut s,
            format!(
                "  writer p99 during <= 2 x alone, 0 errors: {:.2} x, {} errors, {} lost   {}",
                r,
                w.during.errors,
                w.during.lost_updates,
                verdict(ok)
            ),
        );
    }
    if let Some(f) = m.final_phase.iter().find(|f| f.contender == "final-ours") {
        let worst_writer = f.writer.as_ref().map(|w| w.max_ms / 1000.0).unwrap_or(0.0);
        let ok = f.longest_block < 1.0 && worst_writer < 1.0;
        push(
            &mut s,
            format!(
                "  final phase blocks writes < 1 s:        {:.3} s longest lock, writer max {:.3} s   {}",
                f.longest_block,
                worst_writer,
                verdict(ok)
            ),
        );
    }
    if let Some(mem) = &b.memory {
        push(
            &mut s,
            format!(
                "  peak memory <= 30 MB:                    {:.1} MB   {}",
                mem.max_rss_mb,
                verdict(mem.max_rss_mb <= 30.0)
            ),
        );
    }
    s
}

/// Run, print the table on stdout, write the JSON if asked.
pub fn main(args: &BenchArgs) -> Result<()> {
    let bench = run(args)?;
    println!("{}", bench.table);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&bench)?)
            .with_context(|| format!("writing {}", path.display()))?;
        say(&format!("wrote {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Op;
    use clap::Parser;

    #[test]
    fn storage_is_named_by_the_deepest_mount_above_it() {
        let mounts = "/dev/vda / ext4 rw,relatime 0 0\n\
                      tmpfs /dev/shm tmpfs rw 0 0\n\
                      /dev/zram0 /mnt/wal\\040disk ext4 rw 0 0\n\
                      /dev/zram1 /mnt/wal\\040disk ext4 rw 0 0\n";
        let on = |p: &str| mounted_on(Path::new(p), mounts);
        assert_eq!(on("/tmp/hydra-upgrade-pg.x/data"), "/dev/vda (ext4, /)");
        assert_eq!(on("/dev/shm/w/pg_wal"), "tmpfs (tmpfs, /dev/shm)");
        // Mounted over: the last one counts; an escaped space in the mount point.
        assert_eq!(
            on("/mnt/wal disk/pg_wal"),
            "/dev/zram1 (ext4, /mnt/wal disk)"
        );
        // A path component, not a string prefix.
        assert_eq!(on("/dev/shmx"), "/dev/vda (ext4, /)");
        assert_eq!(mounted_on(Path::new("/x"), ""), "unknown");
    }

    #[test]
    fn the_alternate_runs_take_the_alternate_pacing_and_nothing_else() {
        let args = BenchArgs::try_parse_from([
            "bench",
            "--pause-ms",
            "1",
            "--target-batch-ms",
            "30",
            "--writer-secs",
            "7",
            "--alternate-pg-setting",
            "wal_compression=lz4",
            "--alternate-pause-ms",
            "5",
        ])
        .unwrap();
        assert_eq!(
            args.alternate().as_deref(),
            Some("wal_compression=lz4, ours' --pause-ms 5")
        );
        let alt = args.alternated();
        assert_eq!((alt.pause_ms, alt.target_batch_ms), (5, 30));
        assert_eq!(alt.writer_secs, 7);
        assert_eq!(alt.alternate_pg_setting, args.alternate_pg_setting);

        let plain = BenchArgs::try_parse_from(["bench", "--pause-ms", "1"]).unwrap();
        assert_eq!(plain.alternate(), None);
        assert_eq!(plain.alternated().pause_ms, 1);
        let batch =
            BenchArgs::try_parse_from(["bench", "--alternate-target-batch-ms", "2"]).unwrap();
        assert_eq!(
            batch.alternate().as_deref(),
            Some("ours' --target-batch-ms 2")
        );
        let alt = batch.alternated();
        assert_eq!((alt.target_batch_ms, alt.pause_ms), (2, 0));
        assert!(!batch.warm_copy && !alt.warm_copy);

        let warm = BenchArgs::try_parse_from(["bench", "--alternate-warm-copy"]).unwrap();
        assert_eq!(warm.alternate().as_deref(), Some("--warm-copy"));
        assert!(!warm.warm_copy && warm.alternated().warm_copy);
        assert_eq!(warm.alternated().pause_ms, warm.pause_ms);
        assert!(!warm.alternated().template_out_of_cache);

        let out =
            BenchArgs::try_parse_from(["bench", "--alternate-template-out-of-cache"]).unwrap();
        assert_eq!(out.alternate().as_deref(), Some("--template-out-of-cache"));
        assert!(!out.template_out_of_cache && out.alternated().template_out_of_cache);
        assert!(!out.alternated().warm_copy);
    }

    #[test]
    fn slow_operations_are_placed_on_the_steps_they_overlapped() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let op = |at_ms: i64, latency_ms: u64| Op {
            start: if at_ms >= 0 {
                t0 + Duration::from_millis(at_ms as u64)
            } else {
                t0 - Duration::from_millis(-at_ms as u64)
            },
            latency_us: latency_ms * 1000,
            insert: false,
            cpu_wait_us: None,
        };
        let stats = WriterStats {
            ops: vec![
                op(-500, 10),
                op(200, 300),
                op(1_100, 100),
                op(900, 700),
                op(3_000, 50),
                op(2_000, 1),
            ],
            ..Default::default()
        };
        let steps = vec![("a".to_owned(), 0.0, 1.0), ("b".to_owned(), 1.5, 1.0)];
        let slow = slowest_ops(&stats, t0, &steps, None, 1, 5);
        let got: Vec<(f64, f64, usize, &str)> = slow
            .iter()
            .map(|o| (o.ms, (o.at * 1000.0).round(), o.run, o.during.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (700.0, 900.0, 2, "a + b"),
                (300.0, 200.0, 2, "a"),
                (100.0, 1_100.0, 2, "between steps"),
                (50.0, 3_000.0, 2, "after the final phase"),
                (10.0, -500.0, 2, "before the final phase"),
            ]
        );
    }
}
