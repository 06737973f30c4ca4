//! `--perf-profile SECS`: which functions the machine's CPUs ran during our walk, user
//! space and kernel alike, by process.
//!
//! `--cpu-census` says how much CPU time each thread took and how much of it was in the
//! kernel; this says on what. Some seconds into the writer-with-backfill run (so that
//! the walk is under way), `perf record -e cpu-clock -a` samples every CPU at 499 Hz for
//! SECS seconds (the software clock: a virtual machine may have no hardware counters),
//! and `perf report` sums the samples by process and symbol. Processes are given by pid,
//! and the bench names the cluster's pids beside the table. Needs `perf` (Debian:
//! `linux-perf`) and root, or `kernel.perf_event_paranoid` at -1; a diagnostic, off by
//! default: the sampling itself takes a little CPU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::exec::Cmd;

/// How long after the walk started the recording begins.
pub const DELAY: Duration = Duration::from_secs(10);

/// How many lines of `perf report` a run keeps.
const TOP: usize = 30;

/// One run's profile: the cluster's processes by pid, then `perf report`'s busiest lines.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Profile {
    pub pids: Vec<(u32, String)>,
    pub lines: Vec<String>,
}

/// A recording under way in a thread of its own.
pub struct Recording {
    file: PathBuf,
    handle: std::thread::JoinHandle<Result<()>>,
}

/// Start recording after [`DELAY`] for `secs` seconds, into `file`.
pub fn start(file: &Path, secs: u64) -> Result<Recording> {
    let record = record(file, secs);
    let handle = std::thread::Builder::new()
        .name("perf".to_owned())
        .spawn(move || {
            std::thread::sleep(DELAY);
            record.run().map(|_| ())
        })?;
    Ok(Recording {
        file: file.to_owned(),
        handle,
    })
}

/// `perf record` of every CPU for `secs` seconds into `file`.
fn record(file: &Path, secs: u64) -> Cmd {
    Cmd::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "499", "-a", "-o"])
        .arg(file.as_os_str())
        .args(["--", "sleep"])
        .arg(secs.to_string())
}

/// Check before a long template that `perf` can record here (root, or a permissive
/// `perf_event_paranoid`), with a one-second recording into `file`.
pub fn check(file: &Path) -> Result<()> {
    record(file, 1)
        .run()
        .context("--perf-profile needs `perf` (Debian: apt-get install linux-perf) and root or kernel.perf_event_paranoid = -1")?;
    std::fs::remove_file(file).ok();
    Ok(())
}

impl Recording {
    /// Wait for the recording to end, then the [`TOP`] lines of its report: share of all
    /// samples, `pid:command`, where (`[k]` the kernel, `[.]` user space), symbol.
    pub fn finish(self) -> Result<Vec<String>> {
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the perf thread panicked"))??;
        let out = Cmd::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "pid,sym",
                "-i",
            ])
            .arg(self.file.as_os_str())
            .run()?;
        std::fs::remove_file(&self.file).ok();
        Ok(report_lines(&out.stdout, TOP))
    }
}

/// The first `top` sample lines of `perf report --stdio`, spaces squeezed.
fn report_lines(report: &str, top: usize) -> Vec<String> {
    report
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && l.split_whitespace()
                    .next()
                    .is_some_and(|w| w.ends_with('%'))
        })
        .take(top)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_keeps_its_sample_lines_only() {
        let report = "# Samples: 1K of event 'cpu-clock'\n#\n# Overhead  Pid:Command  Symbol\n#\n    41.20%    24530:postgres  [.] heap_page_prune\n     3.05%       77:kdamond.0  [k] damon_pa_pageout\n\n#\n# (Tip: ...)\n";
        assert_eq!(
            report_lines(report, 5),
            vec![
                "41.20% 24530:postgres [.] heap_page_prune",
                "3.05% 77:kdamond.0 [k] damon_pa_pageout"
            ]
        );
        assert_eq!(report_lines(report, 1).len(), 1);
    }
}
