//! `--wal-trace`: what the writer's slow operations have in common. While our backfill and
//! the writer run, a third session samples every 5 ms the WAL insert and flush positions
//! and what the writer's backend is doing (`pg_stat_activity`: its wait event, or running).
//! Afterwards each writer operation is given, interpolated between samples, the WAL
//! inserted (by anyone) while it ran and the WAL not yet flushed when it started (a
//! synchronous commit must flush both), the wait events sampled while it ran, and whether
//! the WAL flushed while it ran finished a WAL segment (the flush that completes a segment
//! also fsyncs it and opens the next file).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;

use crate::db::Db;
use crate::dsn::Dsn;
use crate::workload::{WriterStats, percentile};

/// The writer's backend is recognised by its statements (`src/workload.rs`); every other
/// client session running a statement (ours, and the bench's horizon sampler while it
/// runs its query) is listed apart.
const SAMPLE: &str = "
WITH active AS (
    SELECT pid,
           coalesce(wait_event_type || ': ' || wait_event, 'no wait event (on a CPU or waiting for one)') AS doing,
           (query LIKE '%INSERT INTO builds (finished, timestamp, project%'
            OR query LIKE '%UPDATE builds SET finished = 1%') AS is_writer
      FROM pg_stat_activity
     WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid())
SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint,
       (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint,
       (SELECT doing FROM active WHERE is_writer LIMIT 1),
       (SELECT string_agg(doing, ' + ' ORDER BY pid) FROM active WHERE NOT is_writer)";

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// WAL insert and flush positions, bytes.
    pub insert: i64,
    pub flush: i64,
    /// What the writer's backend was doing, when it was running a statement.
    pub writer: Option<String>,
    /// What the other client sessions running a statement were doing (ours), if any.
    pub others: Option<String>,
}

/// What the sampler saw.
pub struct Samples {
    pub samples: Vec<Sample>,
    /// The server's `wal_segment_size`, bytes.
    pub segment_bytes: i64,
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Samples>>,
}

impl Sampler {
    pub fn start(dsn: Dsn) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut db = Db::connect(&dsn)?;
            let segment_bytes: i64 = db
                .client()
                .query_one(
                    "SELECT pg_size_bytes(current_setting('wal_segment_size'))",
                    &[],
                )?
                .get(0);
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                let row = db.client().query_one(SAMPLE, &[])?;
                samples.push(Sample {
                    at: Instant::now(),
                    insert: row.get(0),
                    flush: row.get(1),
                    writer: row.get(2),
                    others: row.get(3),
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(Samples {
                samples,
                segment_bytes,
            })
        });
        Sampler { stop, handle }
    }

    pub fn stop(self) -> Result<Samples> {
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
    /// The writer backend's wait events sampled while slow operations ran, most first
    /// (all of them; summed over runs in the medians).
    pub slow_waits: Vec<(String, usize)>,
    pub other_waits: Vec<(String, usize)>,
    /// The same for the other client sessions running a statement (ours).
    pub slow_ours_waits: Vec<(String, usize)>,
    pub other_ours_waits: Vec<(String, usize)>,
    /// Operations while which the WAL flushed crossed a segment boundary (from the flush
    /// position at their start to the insert position at their end).
    pub slow_segment_ends: usize,
    pub other_segment_ends: usize,
}

impl WalTrace {
    /// Two lines: the slow operations against the others, kB of WAL inserted while they
    /// ran / unflushed when they started (medians), and how many ran while a segment ended.
    pub fn describe(&self) -> String {
        format!(
            "  {} ops over {:.2} ms: {:.0} / {:.0} ({} above the others' p90 while running; {} while a WAL segment ended)\n  {} other ops: {:.0} / {:.0} (p90 while running {:.0}; {} while a WAL segment ended)",
            self.slow_ops,
            self.threshold_ms,
            self.slow_median_kb,
            self.slow_backlog_median_kb,
            self.slow_above_other_p90,
            self.slow_segment_ends,
            self.other_ops,
            self.other_median_kb,
            self.other_backlog_median_kb,
            self.other_p90_kb,
            self.other_segment_ends
        )
    }
}

/// The insert and flush positions at `t`, linear between the samples around it.
fn lsn_at(samples: &[Sample], t: Instant) -> Option<(f64, f64)> {
    let i = samples.partition_point(|s| s.at <= t);
    if i == 0 || i == samples.len() {
        return None;
    }
    let (a, b) = (&samples[i - 1], &samples[i]);
    let span = (b.at - a.at).as_secs_f64();
    let f = if span > 0.0 {
        (t - a.at).as_secs_f64() / span
    } else {
        0.0
    };
    let at = |x: i64, y: i64| x as f64 + f * (y - x) as f64;
    Some((at(a.insert, b.insert), at(a.flush, b.flush)))
}

/// The samples taken between `start` and `end`.
pub fn samples_between(samples: &[Sample], start: Instant, end: Instant) -> &[Sample] {
    let from = samples.partition_point(|s| s.at < start);
    let to = samples.partition_point(|s| s.at <= end);
    &samples[from..to]
}

/// Count labels, most frequent first (ties by name).
pub fn tally<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for l in labels {
        *counts.entry(l).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().map(|(l, n)| (l.to_owned(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

pub fn analyse(trace: &Samples, stats: &WriterStats, threshold_ms: f64) -> WalTrace {
    let samples = &trace.samples;
    let segment = trace.segment_bytes.max(1) as f64;
    // Per operation: (kB inserted while it ran, kB unflushed when it started, whether a
    // segment ended in between).
    let mut slow: Vec<(f64, f64, bool)> = Vec::new();
    let mut other: Vec<(f64, f64, bool)> = Vec::new();
    let (mut slow_waits, mut other_waits): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let (mut slow_ours, mut other_ours): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for writer_op in &stats.ops {
        let start = writer_op.start;
        let end = start + Duration::from_micros(writer_op.latency_us);
        let (Some((a, flushed)), Some((b, _))) = (lsn_at(samples, start), lsn_at(samples, end))
        else {
            continue;
        };
        let op = (
            (b - a) / 1024.0,
            (a - flushed).max(0.0) / 1024.0,
            (flushed / segment).floor() != (b / segment).floor(),
        );
        let sampled = samples_between(samples, start, end);
        let waits = sampled.iter().filter_map(|s| s.writer.as_deref());
        let ours = sampled.iter().filter_map(|s| s.others.as_deref());
        if writer_op.latency_us as f64 / 1000.0 > threshold_ms {
            slow.push(op);
            slow_waits.extend(waits);
            slow_ours.extend(ours);
        } else {
            other.push(op);
            other_waits.extend(waits);
            other_ours.extend(ours);
        }
    }
    let during = |v: &[(f64, f64, bool)]| v.iter().map(|x| x.0).collect::<Vec<f64>>();
    let backlog = |v: &[(f64, f64, bool)]| v.iter().map(|x| x.1).collect::<Vec<f64>>();
    let segment_ends = |v: &[(f64, f64, bool)]| v.iter().filter(|x| x.2).count();
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
        slow_waits: tally(slow_waits.into_iter()),
        other_waits: tally(other_waits.into_iter()),
        slow_ours_waits: tally(slow_ours.into_iter()),
        other_ours_waits: tally(other_ours.into_iter()),
        slow_segment_ends: segment_ends(&slow),
        other_segment_ends: segment_ends(&other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Op;

    #[test]
    fn slow_operations_are_given_the_wal_written_while_they_ran() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        // 1 kB per ms, except 100 kB between 50 and 60 ms; flushed up to 0, then to 50 kB
        // at 60 ms.
        let k = 1024;
        let sample = |t: u64, insert: i64, flush: i64, writer: Option<&str>| Sample {
            at: ms(t),
            insert: insert * k,
            flush: flush * k,
            writer: writer.map(str::to_owned),
            others: None,
        };
        let mut samples = vec![
            sample(0, 0, 0, None),
            sample(50, 50, 0, None),
            sample(54, 90, 20, Some("LWLock: WALWrite")),
            sample(60, 150, 50, None),
            sample(100, 190, 190, Some("IO: WALSync")),
        ];
        // Our session, writing WAL itself while the slow operation waits for the lock.
        samples[2].others = Some("IO: WALWrite".to_owned());
        let op = |start: u64, latency_us: u64| Op {
            start: ms(start),
            latency_us,
            insert: false,
            cpu_wait_us: None,
        };
        let stats = WriterStats {
            ops: vec![
                op(10, 1_000),
                op(20, 2_000),
                op(52, 5_000),
                op(70, 1_000),
                op(200, 9_000),
            ],
            ..Default::default()
        };
        // Segments of 64 kB: the slow operation (52..57 ms) and the one at 70 ms flush
        // past 64 kB; the ones at 10 and 20 ms do not.
        let trace = Samples {
            samples,
            segment_bytes: 64 * k,
        };
        let w = analyse(&trace, &stats, 3.0);
        // The operation at 200 ms lies outside the samples.
        assert_eq!((w.slow_ops, w.other_ops), (1, 3));
        assert!((w.slow_median_kb - 50.0).abs() < 1e-9, "{w:?}");
        assert!((w.other_median_kb - 1.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.slow_above_other_p90, 1);
        // At 52 ms: 70 kB inserted, 10 kB flushed. The others: 10, 20 and 75 kB unflushed.
        assert!((w.slow_backlog_median_kb - 60.0).abs() < 1e-9, "{w:?}");
        assert!((w.other_backlog_median_kb - 20.0).abs() < 1e-9, "{w:?}");
        assert_eq!(w.slow_waits, vec![("LWLock: WALWrite".to_owned(), 1)]);
        assert!(w.other_waits.is_empty(), "{w:?}");
        assert_eq!(w.slow_ours_waits, vec![("IO: WALWrite".to_owned(), 1)]);
        assert!(w.other_ours_waits.is_empty(), "{w:?}");
        assert_eq!((w.slow_segment_ends, w.other_segment_ends), (1, 1), "{w:?}");
        assert_eq!(
            w.describe(),
            "  1 ops over 3.00 ms: 50 / 60 (1 above the others' p90 while running; 1 while a WAL segment ended)\n  \
             3 other ops: 1 / 20 (p90 while running 2; 1 while a WAL segment ended)"
        );
    }
}
