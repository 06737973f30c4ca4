//! A Hydra-shaped writer for tests and the benchmark: the evaluator inserting new builds
//! (with jobset_id, as the migration package does, or without it, as an older Hydra
//! would) and the queue runner finishing random old builds. It records every operation's
//! latency, every error, and the last value it wrote to each build it touched, so a
//! caller can prove no update was lost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::db::Db;
use crate::dsn::Dsn;

#[derive(Debug, Clone)]
pub struct WriterSpec {
    /// Write jobset_id on inserted builds (the migration package) or leave it NULL
    /// (an older evaluator still running).
    pub with_jobset_id: bool,
    /// Pause between operations.
    pub pause: Duration,
    pub seed: u64,
    /// Stop after this many operations (0: until told to stop).
    pub max_ops: u64,
    /// Only finish builds whose id % .0 == .1, so several writers never race on a row
    /// (each can then prove its own last write survived).
    pub slice: (i32, i32),
}

/// One operation of the writer.
#[derive(Debug, Clone, Copy)]
pub struct Op {
    pub start: Instant,
    pub latency_us: u64,
    /// An insert (the evaluator), else a finish (the queue runner).
    pub insert: bool,
    /// How long, within the operation, the writer's server process and its client
    /// thread were runnable but waited for a CPU (`run_delay` of
    /// `/proc/<pid>/schedstat`); `None` where that cannot be read.
    pub cpu_wait_us: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
pub struct WriterStats {
    pub inserts: u64,
    pub updates: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Every operation, in the order they ran.
    #[serde(skip)]
    pub ops: Vec<Op>,
    /// Build id -> the `size` the queue runner last wrote to it.
    #[serde(skip)]
    pub marks: HashMap<i32, i64>,
    /// Ids of builds it inserted.
    #[serde(skip)]
    pub inserted: Vec<i32>,
}

impl WriterStats {
    /// The p-th percentile latency (0..=100), in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.percentile_ms_where(p, |_| true)
    }

    /// The p-th percentile latency of the inserts (`true`) or of the finishes, in ms.
    pub fn percentile_ms_of(&self, inserts: bool, p: f64) -> f64 {
        self.percentile_ms_where(p, |was_insert| was_insert == inserts)
    }

    /// The p-th percentile latency, in ms, of the operations whose kind (insert or not)
    /// `keep` accepts.
    fn percentile_ms_where(&self, p: f64, keep: impl Fn(bool) -> bool) -> f64 {
        percentile(
            self.ops
                .iter()
                .filter(|op| keep(op.insert))
                .map(|op| op.latency_us as f64 / 1000.0)
                .collect(),
            p,
        )
    }

    /// The p-th percentile of the operations' waits for a CPU (`Op::cpu_wait_us`), in
    /// ms; `None` when they were not measured.
    pub fn cpu_wait_percentile_ms(&self, p: f64) -> Option<f64> {
        self.percentile_of_cpu_waits(p, |_, wait| wait)
    }

    /// The p-th percentile latency, in ms, had no operation waited for a CPU (each
    /// operation's latency less its `cpu_wait_us`); `None` when waits were not measured.
    pub fn percentile_ms_without_cpu_waits(&self, p: f64) -> Option<f64> {
        self.percentile_of_cpu_waits(p, |op, wait| op.latency_us.saturating_sub(wait))
    }

    /// The p-th percentile, in ms, of `value(op, its cpu wait)` in µs over the
    /// operations; `None` unless every operation's wait was measured.
    fn percentile_of_cpu_waits(&self, p: f64, value: impl Fn(&Op, u64) -> u64) -> Option<f64> {
        let values: Option<Vec<f64>> = self
            .ops
            .iter()
            .map(|op| op.cpu_wait_us.map(|wait| value(op, wait) as f64 / 1000.0))
            .collect();
        values.filter(|v| !v.is_empty()).map(|v| percentile(v, p))
    }

    /// How many operations took longer than `ms` milliseconds.
    pub fn count_over_ms(&self, ms: u64) -> u64 {
        self.ops
            .iter()
            .filter(|op| op.latency_us > ms * 1000)
            .count() as u64
    }
}

/// The p-th percentile (0..=100) of `v` by nearest rank; 0 when `v` is empty.
pub fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

const INSERT_WITH_ID: &str = "
INSERT INTO builds (finished, timestamp, project, jobset, job, nixName, drvPath, system,
                    priority, globalPriority, jobset_id)
VALUES (0, extract(epoch FROM now())::int, $1, $2, $3, 'new', $4, 'x86_64-linux', 100, 0, $5)
RETURNING id";
const INSERT_WITHOUT_ID: &str = "
INSERT INTO builds (finished, timestamp, project, jobset, job, nixName, drvPath, system,
                    priority, globalPriority)
VALUES (0, extract(epoch FROM now())::int, $1, $2, $3, 'new', $4, 'x86_64-linux', 100, 0)
RETURNING id";
const FINISH: &str = "
UPDATE builds SET finished = 1, buildStatus = 0, startTime = coalesce(nullif(startTime, 0), $2),
                  stopTime = $2, size = $3
 WHERE id = $1";

/// The time a process or thread has spent runnable but waiting for a CPU, in µs: the
/// second field of a Linux `schedstat` file (`CONFIG_SCHED_INFO`). `None` where there
/// is no such file.
fn cpu_wait_us(schedstat: &Path) -> Option<u64> {
    run_delay_us(&std::fs::read_to_string(schedstat).ok()?)
}

/// `run_delay` (ns, the second of the three fields of a `schedstat` file), in µs.
fn run_delay_us(schedstat: &str) -> Option<u64> {
    schedstat_us(schedstat).map(|(_, waited)| waited)
}

/// The time on a CPU and `run_delay` (ns, the first two fields of a `schedstat` file),
/// in µs.
pub(crate) fn schedstat_us(schedstat: &str) -> Option<(u64, u64)> {
    let mut fields = schedstat.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()?? / 1000, fields.next()?? / 1000))
}

/// How long server process `pid` has run on a CPU and waited, runnable, for one (µs);
/// `None` where that cannot be read.
pub fn server_cpu_us(pid: i32) -> Option<(u64, u64)> {
    schedstat_us(&std::fs::read_to_string(server_schedstat(pid)?).ok()?)
}

/// The `schedstat` file of server process `pid`, when the server runs on this machine
/// (as the tests' and the benchmark's throwaway clusters do).
fn server_schedstat(pid: i32) -> Option<PathBuf> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
    let is_postgres = String::from_utf8_lossy(&cmdline).contains("postgres");
    is_postgres.then(|| proc.join("schedstat"))
}

/// The writer's `application_name`.
pub const APPLICATION_NAME: &str = "hydra-shaped writer";

/// Run until `stop` is set (or `max_ops`). Errors are counted, never fatal.
pub fn run(dsn: &Dsn, spec: &WriterSpec, stop: Arc<AtomicBool>) -> Result<WriterStats> {
    let mut db = Db::connect(dsn)?;
    // Waits for a CPU are read before and after each operation, outside its timing:
    // they tell a slow commit that waited on the disk from one that waited its turn.
    let server = server_schedstat(db.backend_pid()?);
    let client = Path::new("/proc/thread-self/schedstat");
    let waited =
        || -> Option<u64> { Some(cpu_wait_us(server.as_deref()?)? + cpu_wait_us(client)?) };
    let c = db.client();
    // Named apart from the tool's own sessions, so that `pg_stat_activity` (and the
    // engine's report of what holds the xmin horizon) tells Hydra's stand-in from us.
    c.batch_execute(&format!("SET application_name = '{APPLICATION_NAME}'"))?;
    let has_id: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'builds'::regclass AND attname = 'jobset_id')",
            &[],
        )?
        .get(0);
    let jobs_sql = if has_id {
        "SELECT j.project, j.jobset, j.name, s.id FROM jobs j JOIN jobsets s ON s.project = j.project AND s.name = j.jobset"
    } else {
        "SELECT project, jobset, name, NULL::int FROM jobs"
    };
    let jobs: Vec<(String, String, String, Option<i32>)> = c
        .query(jobs_sql, &[])
        .context("loading jobs for the writer")?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let max_id: i32 = c
        .query_one("SELECT coalesce(max(id), 1) FROM builds", &[])?
        .get(0);
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    let mut stats = WriterStats::default();
    let mut counter: i64 = 1_000_000_000 + (spec.seed as i64 % 1000) * 1_000_000;
    while !stop.load(Ordering::SeqCst)
        && (spec.max_ops == 0 || stats.inserts + stats.updates < spec.max_ops)
    {
        let waited_before = waited();
        let t0 = Instant::now();
        let insert = rng.bool() && !jobs.is_empty();
        let result = if insert {
            let (p, j, n, id) = &jobs[rng.usize(..jobs.len())];
            let drv = format!("/nix/store/{:032x}-{n}.drv", rng.u128(..));
            let row = if spec.with_jobset_id && has_id {
                c.query_one(INSERT_WITH_ID, &[p, j, n, &drv, id])
            } else {
                c.query_one(INSERT_WITHOUT_ID, &[p, j, n, &drv])
            };
            row.map(|r| {
                stats.inserts += 1;
                stats.inserted.push(r.get(0));
            })
        } else {
            let (n, k) = (spec.slice.0.max(1), spec.slice.1);
            let mut id = rng.i32(1..=max_id) / n * n + k;
            if id < 1 {
                id += n;
            }
            counter += 1;
            let now = 1_700_000_000i32 + rng.i32(0..1_000_000);
            c.execute(FINISH, &[&id, &now, &counter]).map(|n| {
                stats.updates += 1;
                if n == 1 {
                    stats.marks.insert(id, counter);
                }
            })
        };
        let latency_us = t0.elapsed().as_micros() as u64;
        stats.ops.push(Op {
            start: t0,
            latency_us,
            insert,
            cpu_wait_us: waited_before
                .zip(waited())
                .map(|(before, after)| after.saturating_sub(before)),
        });
        if let Err(e) = result {
            stats.errors += 1;
            if stats.error_samples.len() < 10 {
                stats.error_samples.push(crate::db::error_text(&e));
            }
        }
        if !spec.pause.is_zero() {
            std::thread::sleep(spec.pause);
        }
    }
    Ok(stats)
}

/// Check that every build the writer finished still holds the value it wrote.
pub fn lost_updates(db: &mut Db, stats: &WriterStats) -> Result<Vec<i32>> {
    let ids: Vec<i32> = stats.marks.keys().copied().collect();
    let rows = db
        .client()
        .query("SELECT id, size FROM builds WHERE id = ANY($1)", &[&ids])?;
    let mut lost: Vec<i32> = rows
        .iter()
        .filter_map(|r| {
            let (id, size): (i32, Option<i64>) = (r.get(0), r.get(1));
            (size != stats.marks.get(&id).copied()).then_some(id)
        })
        .collect();
    lost.sort_unstable();
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(latency_us: u64, cpu_wait_us: Option<u64>) -> Op {
        Op {
            start: Instant::now(),
            latency_us,
            insert: false,
            cpu_wait_us,
        }
    }

    #[test]
    fn run_delay_is_the_second_schedstat_field() {
        assert_eq!(run_delay_us("233212591 54317155 1811\n"), Some(54_317));
        assert_eq!(
            schedstat_us("233212591 54317155 1811\n"),
            Some((233_212, 54_317))
        );
        assert_eq!(run_delay_us("233212591\n"), None);
        assert_eq!(run_delay_us(""), None);
    }

    #[test]
    fn latency_without_cpu_waits_subtracts_each_operations_own_wait() {
        let stats = WriterStats {
            ops: vec![
                op(1_000, Some(0)),
                op(5_000, Some(4_000)),
                op(2_000, Some(100)),
            ],
            ..WriterStats::default()
        };
        assert_eq!(stats.percentile_ms(100.0), 5.0);
        assert_eq!(stats.cpu_wait_percentile_ms(100.0), Some(4.0));
        // 1.0, 1.0 and 1.9 ms once the waits are taken out.
        assert_eq!(stats.percentile_ms_without_cpu_waits(100.0), Some(1.9));
        let unmeasured = WriterStats {
            ops: vec![op(1_000, Some(0)), op(2_000, None)],
            ..WriterStats::default()
        };
        assert_eq!(unmeasured.cpu_wait_percentile_ms(99.0), None);
        assert_eq!(unmeasured.percentile_ms_without_cpu_waits(99.0), None);
    }

    #[test]
    fn the_writer_reads_its_own_threads_cpu_waits_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(cpu_wait_us(Path::new("/proc/thread-self/schedstat")).is_some());
        }
    }
}
