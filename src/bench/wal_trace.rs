//! `--wal-trace`: what the writer's slow operations have in common. While our backfill and
//! the writer run, a third session samples the WAL insert and flush positions every 5 ms;
//! afterwards each writer operation is given, interpolated between samples, the WAL
//! inserted (by anyone) while it ran and the WAL not yet flushed when it started. A
//! synchronous commit must flush both; if slow operations had much more of either than
//! the others, they were waiting for the WAL.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::db::Db;
use crate::dsn::Dsn;
use crate::workload::WriterStats;

const SAMPLE: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint,
                              (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint";

/// When, the WAL insert position, the WAL flush position (bytes).
pub type Sample = (Instant, i64, i64);

pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Vec<Sample>>>,
}

impl Sampler {
    pub fn start(dsn: Dsn) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut db = Db::connect(&dsn)?;
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let row = db.client().query_one(SAMPLE, &[])?;
                samples.push((Instant::now(), row.get(0), row.get(1)));
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(samples)
        });
        Sampler { stop, handle }
    }

    pub fn stop(self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the WAL sampler thread panicked"))?
    }
}

/// WAL inserted while the writer's operations ran: those over `threshold_ms` against the
/// rest (operations outside the sampled time are left out).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WalTrace {
    pub threshold_ms: f64,
    pub slow_ops: usize,
    pub other_ops: usize,
    /// Median kB of WAL inserted while a slow operation ran.
    pub slow_median_kb: f64,
    pub other_median_kb: f64,
    pub other_p90_kb: f64,
    /// Slow operations during which more WAL was inserted than during 90 % of the others.
    pub slow_above_other_p90: usize,
    /// Median kB of WAL inserted but not yet flushed when a slow operation started.
    pub slow_backlog_median_kb: f64,
    pub other_backlog_median_kb: f64,
}

/// The insert and flush positions at `t`, linear between the samples around it.
fn lsn_at(samples: &[Sample], t: Instant) -> Option<(f64, f64)> {
    let i = samples.partition_point(|(s, _, _)| *s <= t);
    if i == 0 || i == samples.len() {
        return None;
    }
    let ((t0, i0, f0), (t1, i1, f1)) = (samples[i - 1], samples[i]);
    let span = (t1 - t0).as_secs_f64();
    let f = if span > 0.0 {
        (t - t0).as_secs_f64() / span
    } else {
        0.0
    };
    let at = |a: i64, b: i64| a as f64 + f * (b - a) as f64;
    Some((at(i0, i1), at(f0, f1)))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

pub fn analyse(samples: &[Sample], stats: &WriterStats, threshold_ms: f64) -> WalTrace {
    // Per operation: (kB inserted while it ran, kB unflushed when it started).
    let mut slow: Vec<(f64, f64)> = Vec::new();
    let mut other: Vec<(f64, f64)> = Vec::new();
    for (start, us) in stats.starts.iter().zip(&stats.latencies_us) {
        let end = *start + Duration::from_micros(*us);
        let (Some((a, flushed)), Some((b, _))) = (lsn_at(samples, *start), lsn_at(samples, end))
        else {
            continue;
        };
        let op = ((b - a) / 1024.0, (a - flushed).max(0.0) / 1024.0);
        if *us as f64 / 1000.0 > threshold_ms {
            slow.push(op);
        } else {
            other.push(op);
        }
    }
    let during = |v: &[(f64, f64)]| v.iter().map(|x| x.0).collect::<Vec<f64>>();
    let backlog = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<f64>>();
    let other_p90 = percentile(during(&other), 90.0);
    WalTrace {
        threshold_ms,
        slow_ops: slow.len(),
        other_ops: other.len(),
        slow_median_kb: percentile(during(&slow), 50.0),
        other_median_kb: percentile(during(&other), 50.0),
        other_p90_kb: other_p90,
        slow_above_other_p90: slow.iter().filter(|x| x.0 > other_p90).count(),
        slow_backlog_median_kb: percentile(backlog(&slow), 50.0),
        other_backlog_median_kb: percentile(backlog(&other), 50.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_operations_are_given_the_wal_written_while_they_ran() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        // 1 kB per ms, except 100 kB between 50 and 60 ms; flushed up to 0, then to 50 kB
        // at 60 ms.
        let k = 1024;
        let samples = vec![
            (ms(0), 0, 0),
            (ms(50), 50 * k, 0),
            (ms(60), 150 * k, 50 * k),
            (ms(100), 190 * k, 190 * k),
        ];
        let stats = WriterStats {
            starts: vec![ms(10), ms(20), ms(52), ms(70), ms(200)],
            latencies_us: vec![1_000, 2_000, 5_000, 1_000, 9_000],
            ..Default::default()
        };
        let w = analyse(&samples, &stats, 3.0);
        // The operation at 200 ms lies outside the samples.
        assert_eq!((w.slow_ops, w.other_ops), (1, 3));
        assert!((w.slow_median_kb - 50.0).abs() < 1e-9, "{w:?}");
        assert!((w.other_median_kb - 1.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.slow_above_other_p90, 1);
        // At 52 ms: 70 kB inserted, 10 kB flushed. The others: 10, 20 and 75 kB unflushed.
        assert!((w.slow_backlog_median_kb - 60.0).abs() < 1e-9, "{w:?}");
        assert!((w.other_backlog_median_kb - 20.0).abs() < 1e-9, "{w:?}");
    }
}
