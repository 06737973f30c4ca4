//! The disks' side of `--cpu-census`: what each whole disk of the machine did over a span
//! (`/proc/diskstats`), and the page cache's size at its two ends (`/proc/meminfo`).
//!
//! Why: at 10M builds the writer's slow operations came with iowait and with its updates
//! of old builds (BENCHMARKS.md, "The WAL on a device of its own"), read as reads of
//! Builds pages the page cache had let go; these counters make such reads, and the
//! WAL's writes and cache flushes, figures of the run rather than a reading.

use serde::Serialize;

use super::proc_stat;

/// A disk's counters at one moment, as `/proc/diskstats` gives them (cumulative since
/// boot): reads and writes completed, 512-byte sectors read and written, cache flushes
/// completed, and milliseconds the device had I/O in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    reads: u64,
    read_sectors: u64,
    writes: u64,
    written_sectors: u64,
    flushes: u64,
    busy_ms: u64,
}

/// One reading: every whole disk's [`Counters`] and the page cache's size.
pub struct Reading {
    disks: Vec<(String, Counters)>,
    cached_kb: Option<i64>,
}

/// What one disk did over a span.
#[derive(Debug, Clone, Serialize)]
pub struct DiskIo {
    pub device: String,
    pub reads: u64,
    pub read_mb: f64,
    pub writes: u64,
    pub written_mb: f64,
    /// Cache flushes the device completed (a filesystem's `fsync` ends in one or more).
    pub flushes: u64,
    /// Percent of the span the device had I/O in flight.
    pub busy_pct: f64,
}

/// The disks and the page cache over a span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Disks {
    /// Every whole disk that did anything in the span, by name.
    pub disks: Vec<DiskIo>,
    /// `/proc/meminfo`'s `Cached` at the span's start and end, MB.
    pub page_cache_mb: Option<(f64, f64)>,
}

impl Reading {
    /// Now; a machine without `/proc/diskstats` reads as one without disks.
    pub fn take() -> Reading {
        let whole: Vec<String> = std::fs::read_dir("/sys/block")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
        Reading {
            disks: disks_of(&stats, &whole),
            cached_kb: proc_stat::meminfo_now_kb("Cached"),
        }
    }
}

/// The whole disks among `/proc/diskstats`' lines: those named in `whole` (the entries of
/// `/sys/block`, where partitions do not appear), loop and RAM devices left out.
fn disks_of(stats: &str, whole: &[String]) -> Vec<(String, Counters)> {
    stats
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let name = *f.get(2)?;
            if !whole.iter().any(|w| w == name)
                || name.starts_with("loop")
                || name.starts_with("ram")
            {
                return None;
            }
            // Counted from the name: 1 reads, 3 sectors read, 5 writes, 7 sectors
            // written, 10 ms doing I/O, 16 flushes (kernels before 5.5 have none).
            let at = |i: usize| f.get(2 + i).and_then(|x| x.parse().ok()).unwrap_or(0);
            Some((
                name.to_owned(),
                Counters {
                    reads: at(1),
                    read_sectors: at(3),
                    writes: at(5),
                    written_sectors: at(7),
                    flushes: at(16),
                    busy_ms: at(10),
                },
            ))
        })
        .collect()
}

/// From `before` to `after`, `seconds` apart.
pub fn between(before: &Reading, after: &Reading, seconds: f64) -> Disks {
    let mb = |sectors: u64| sectors as f64 * 512.0 / 1_048_576.0;
    let disks = after
        .disks
        .iter()
        .filter_map(|(name, a)| {
            let b = before
                .disks
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| *c)
                .unwrap_or_default();
            let d = |f: fn(&Counters) -> u64| f(a).saturating_sub(f(&b));
            let io = DiskIo {
                device: name.clone(),
                reads: d(|c| c.reads),
                read_mb: mb(d(|c| c.read_sectors)),
                writes: d(|c| c.writes),
                written_mb: mb(d(|c| c.written_sectors)),
                flushes: d(|c| c.flushes),
                busy_pct: 100.0 * d(|c| c.busy_ms) as f64 / (seconds * 1000.0).max(1.0),
            };
            (io.reads + io.writes + io.flushes > 0).then_some(io)
        })
        .collect();
    let page_cache_mb = before
        .cached_kb
        .zip(after.cached_kb)
        .map(|(b, a)| (b as f64 / 1024.0, a as f64 / 1024.0));
    Disks {
        disks,
        page_cache_mb,
    }
}

impl Disks {
    /// "vda: 1,234 reads (56 MB), ... ; page cache 12.3 -> 13.4 GB", or "" if nothing.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .disks
            .iter()
            .map(|d| {
                format!(
                    "{}: {} reads ({:.0} MB), {} writes ({:.0} MB), {} flushes, busy {:.0} %",
                    d.device, d.reads, d.read_mb, d.writes, d.written_mb, d.flushes, d.busy_pct
                )
            })
            .collect();
        if let Some((b, a)) = self.page_cache_mb {
            parts.push(format!(
                "page cache {:.1} -> {:.1} GB",
                b / 1024.0,
                a / 1024.0
            ));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATS: &str = "   7       0 loop0 5 0 40 1 0 0 0 0 0 1 1 0 0 0 0 0 0
 254       0 vda 1000 10 80000 500 2000 30 160000 900 0 1200 1400 0 0 0 0 300 20
 254       1 vda1 900 10 70000 400 1900 30 150000 800 0 1100 1300 0 0 0 0 0 0
 253       0 zram0 0 0 0 0 7 0 56 0 0 1 1
";

    fn whole() -> Vec<String> {
        ["loop0", "vda", "zram0"].map(String::from).to_vec()
    }

    #[test]
    fn whole_disks_are_read_partitions_and_loops_left_out() {
        let disks = disks_of(STATS, &whole());
        let names: Vec<&str> = disks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["vda", "zram0"]);
        assert_eq!(
            disks[0].1,
            Counters {
                reads: 1000,
                read_sectors: 80000,
                writes: 2000,
                written_sectors: 160000,
                flushes: 300,
                busy_ms: 1200,
            }
        );
        // A kernel without the flush fields: none counted.
        assert_eq!(disks[1].1.flushes, 0);
        assert_eq!(disks[1].1.writes, 7);
    }

    #[test]
    fn a_span_counts_what_changed_and_leaves_idle_disks_out() {
        let before = Reading {
            disks: disks_of(STATS, &whole()),
            cached_kb: Some(1024 * 1024),
        };
        let later = STATS.replace(
            "vda 1000 10 80000 500 2000 30 160000 900 0 1200",
            "vda 1100 10 82048 500 2500 30 162048 900 0 3200",
        );
        let later = later.replace(" 300 20\n", " 340 20\n");
        let after = Reading {
            disks: disks_of(&later, &whole()),
            cached_kb: Some(2 * 1024 * 1024),
        };
        let d = between(&before, &after, 4.0);
        assert_eq!(d.disks.len(), 1, "{d:?}");
        let vda = &d.disks[0];
        assert_eq!((vda.reads, vda.writes, vda.flushes), (100, 500, 40));
        assert_eq!((vda.read_mb, vda.written_mb), (1.0, 1.0));
        assert_eq!(vda.busy_pct, 50.0);
        assert_eq!(d.page_cache_mb, Some((1024.0, 2048.0)));
        assert_eq!(
            d.describe(),
            "vda: 100 reads (1 MB), 500 writes (1 MB), 40 flushes, busy 50 %; page cache 1.0 -> 2.0 GB"
        );
    }

    /// This machine's own counters: a real reading parses, and the page cache has a size.
    #[test]
    fn this_machine_can_be_read() {
        let r = Reading::take();
        assert!(r.cached_kb.is_some_and(|kb| kb > 0));
        let d = between(&r, &Reading::take(), 1.0);
        assert!(d.disks.iter().all(|io| io.busy_pct <= 100.0), "{d:?}");
    }
}
