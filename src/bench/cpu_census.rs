//! `--cpu-census`: where this machine's CPU time went over a span (the writer's idle
//! baseline, the writer during our walk), for the whole machine and by thread.
//!
//! The writer's slow operations wait for a CPU (its `cpu wait` column), and on two CPUs
//! whatever else runs decides how long: our walk, PostgreSQL's WAL writer, the kernel's
//! own threads (block I/O completions, page reclaim, the host's DAMON scheme that pages
//! file pages out; see BENCHMARKS.md, "Machine"). This reads, before and after the span,
//! the machine's split of CPU time (`/proc/stat`: user, system, iowait, interrupts,
//! steal, idle) and every thread's time on a CPU and runnable waiting for one
//! (`/proc/PID/task/TID/schedstat`, read as µs) with the share of the former spent in
//! the kernel (its `stat`'s user and system ticks), and sums the difference by name: a
//! PostgreSQL process by its `application_name` or backend type, a kernel thread or any
//! other process by its command name. A thread that ended within the span is missing from
//! the threads (the machine's split still counts it); one that started within it counts
//! from its start. Beside the CPUs, what the disks did and the page cache's size
//! ([`super::disk_stats`]).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::disk_stats;

/// The machine's split: `/proc/stat`'s fields with `nice` folded into `user`, `irq` and
/// `softirq` summed as "interrupts", `idle` last (`guest` is already counted in `user`).
const MACHINE: [&str; 6] = ["user", "system", "iowait", "interrupts", "steal", "idle"];

/// One reading of the machine and of every thread.
pub struct Snapshot {
    at: Instant,
    cpus: usize,
    machine: [u64; 6],
    /// By thread id: its process id, its command name, and its [`Times`].
    threads: HashMap<u32, (u32, String, Times)>,
    disks: disk_stats::Reading,
}

/// A thread's counters: µs on a CPU and µs runnable waiting for one (`schedstat`), and
/// clock ticks in user and in kernel mode (`stat`'s `utime` and `stime`).
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    on_us: u64,
    wait_us: u64,
    user_ticks: u64,
    system_ticks: u64,
}

impl Times {
    fn since(&self, earlier: &Times) -> Times {
        Times {
            on_us: self.on_us.saturating_sub(earlier.on_us),
            wait_us: self.wait_us.saturating_sub(earlier.wait_us),
            user_ticks: self.user_ticks.saturating_sub(earlier.user_ticks),
            system_ticks: self.system_ticks.saturating_sub(earlier.system_ticks),
        }
    }

    fn add(&mut self, other: &Times) {
        self.on_us += other.on_us;
        self.wait_us += other.wait_us;
        self.user_ticks += other.user_ticks;
        self.system_ticks += other.system_ticks;
    }
}

/// A name's share over a span, in percent of one CPU; `kernel_pct` is the part of
/// `on_cpu_pct` spent in the kernel (by the ticks' split).
#[derive(Debug, Clone, Serialize)]
pub struct Share {
    pub name: String,
    pub on_cpu_pct: f64,
    pub waiting_pct: f64,
    pub kernel_pct: f64,
}

/// What [`census`] found over one span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Census {
    pub seconds: f64,
    pub cpus: usize,
    /// [`MACHINE`]'s names with their percent of one CPU (all of them add up to
    /// `cpus` x 100).
    pub machine: Vec<(String, f64)>,
    /// Every name's threads summed, the busiest first.
    pub threads: Vec<Share>,
    /// What the disks did, and the page cache's size at the two ends.
    pub disks: disk_stats::Disks,
}

impl Snapshot {
    pub fn take() -> Result<Snapshot> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let (cpus, machine) = machine_of(&stat).context("no cpu lines in /proc/stat")?;
        let mut threads = HashMap::new();
        for pid in numbered("/proc")? {
            // Processes and threads come and go while this reads: a missing one is skipped.
            let Ok(tids) = numbered(&format!("/proc/{pid}/task")) else {
                continue;
            };
            for tid in tids {
                let dir = format!("/proc/{pid}/task/{tid}");
                let (Ok(comm), Ok(sched), Ok(stat)) = (
                    std::fs::read_to_string(format!("{dir}/comm")),
                    std::fs::read_to_string(format!("{dir}/schedstat")),
                    std::fs::read_to_string(format!("{dir}/stat")),
                ) else {
                    continue;
                };
                if let Some(times) = times_of(&sched, &stat) {
                    threads.insert(tid, (pid, comm.trim().to_owned(), times));
                }
            }
        }
        Ok(Snapshot {
            at: Instant::now(),
            cpus,
            machine,
            threads,
            disks: disk_stats::Reading::take(),
        })
    }
}

/// A thread's [`Times`] from its `schedstat` and `stat`.
fn times_of(schedstat: &str, stat: &str) -> Option<Times> {
    let (on_us, wait_us) = crate::workload::schedstat_us(schedstat)?;
    let tick = |n| super::proc_stat::field_of(stat, n).and_then(|t| u64::try_from(t).ok());
    Some(Times {
        on_us,
        wait_us,
        user_ticks: tick(11)?,
        system_ticks: tick(12)?,
    })
}

fn numbered(dir: &str) -> Result<Vec<u32>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("listing {dir}"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The number of CPUs and the summed `cpu` line of `/proc/stat`, in [`MACHINE`]'s order.
fn machine_of(stat: &str) -> Option<(usize, [u64; 6])> {
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    let f: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let machine = [at(0) + at(1), at(2), at(4), at(5) + at(6), at(7), at(3)];
    (cpus > 0).then_some((cpus, machine))
}

/// The name a thread's time is summed under: `servers` names PostgreSQL's processes by
/// pid; a kernel worker loses the suffix naming its current work item.
fn name_of(pid: u32, comm: &str, servers: &HashMap<u32, String>) -> String {
    if let Some(name) = servers.get(&pid) {
        return name.clone();
    }
    if pid == std::process::id() {
        return format!("bench: {comm}");
    }
    match comm.split_once('-') {
        Some((worker, _)) if worker.starts_with("kworker/") => worker.to_owned(),
        _ => comm.to_owned(),
    }
}

/// From `before` to `after`: the machine's split and every name's threads, in percent of
/// one CPU over the span.
pub fn census(before: &Snapshot, after: &Snapshot, servers: &HashMap<u32, String>) -> Census {
    let seconds = after.at.duration_since(before.at).as_secs_f64();
    let deltas: Vec<u64> = (0..MACHINE.len())
        .map(|i| after.machine[i].saturating_sub(before.machine[i]))
        .collect();
    let total = deltas.iter().sum::<u64>().max(1) as f64;
    let machine = MACHINE
        .iter()
        .zip(&deltas)
        .map(|(name, d)| {
            (
                (*name).to_owned(),
                100.0 * after.cpus as f64 * *d as f64 / total,
            )
        })
        .collect();
    let span_us = (seconds * 1e6).max(1.0);
    let mut by_name: HashMap<String, Times> = HashMap::new();
    for (tid, (pid, comm, times)) in &after.threads {
        let spent = match before.threads.get(tid) {
            Some((pid0, _, earlier)) if pid0 == pid => times.since(earlier),
            _ => *times,
        };
        by_name
            .entry(name_of(*pid, comm, servers))
            .or_default()
            .add(&spent);
    }
    let mut threads: Vec<Share> = by_name
        .into_iter()
        .map(|(name, t)| {
            let on_cpu_pct = 100.0 * t.on_us as f64 / span_us;
            let ticks = (t.user_ticks + t.system_ticks).max(1) as f64;
            Share {
                name,
                on_cpu_pct,
                waiting_pct: 100.0 * t.wait_us as f64 / span_us,
                kernel_pct: on_cpu_pct * t.system_ticks as f64 / ticks,
            }
        })
        .collect();
    threads.sort_by(|a, b| {
        b.on_cpu_pct
            .total_cmp(&a.on_cpu_pct)
            .then_with(|| a.name.cmp(&b.name))
    });
    Census {
        seconds,
        cpus: after.cpus,
        machine,
        threads,
        disks: disk_stats::between(&before.disks, &after.disks, seconds),
    }
}

impl Census {
    /// One line: the machine's split, then the `top` busiest names as "on a CPU/waiting"
    /// (percent of one CPU), and the rest summed.
    pub fn describe(&self, top: usize) -> String {
        let machine: Vec<String> = self
            .machine
            .iter()
            .map(|(name, pct)| format!("{name} {pct:.0}"))
            .collect();
        let mut threads: Vec<String> = self
            .threads
            .iter()
            .take(top)
            .map(|t| {
                format!(
                    "{} {:.1}/{:.1}/{:.1}",
                    t.name, t.on_cpu_pct, t.waiting_pct, t.kernel_pct
                )
            })
            .collect();
        let rest = &self.threads[top.min(self.threads.len())..];
        if !rest.is_empty() {
            threads.push(format!(
                "{} others {:.1}/{:.1}/{:.1}",
                rest.len(),
                rest.iter().map(|t| t.on_cpu_pct).sum::<f64>(),
                rest.iter().map(|t| t.waiting_pct).sum::<f64>(),
                rest.iter().map(|t| t.kernel_pct).sum::<f64>()
            ));
        }
        let disks = self.disks.describe();
        format!(
            "{:.0} s, machine ({} CPUs = {} %): {}; threads (on a CPU/runnable waiting/of the first in the kernel): {}{}{}",
            self.seconds,
            self.cpus,
            self.cpus * 100,
            machine.join(", "),
            threads.join(", "),
            if disks.is_empty() { "" } else { "; disks: " },
            disks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_line_is_summed_and_the_cpus_counted() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 5 0 10 150 2 2 3 3 0 0\ncpu1 5 1 10 150 2 3 3 4 0 0\nintr 1 2 3\n";
        assert_eq!(machine_of(stat), Some((2, [11, 20, 4, 11, 7, 300])));
        assert_eq!(machine_of("intr 1 2\n"), None);
    }

    #[test]
    fn a_threads_times_come_from_schedstat_and_stat() {
        let stat = "77 (kworker/1:1H-kblockd) I 2 0 0 0 -1 69238880 0 0 0 0 12 345 0 0 0 -20 1";
        let t = times_of("4500000 600000 7\n", stat).unwrap();
        assert_eq!(
            (t.on_us, t.wait_us, t.user_ticks, t.system_ticks),
            (4500, 600, 12, 345)
        );
        assert!(times_of("4500000\n", stat).is_none());
        assert!(times_of("4500000 600000 7\n", "77 (x) I 2").is_none());
    }

    #[test]
    fn threads_are_named_by_server_pid_then_by_command() {
        let servers = HashMap::from([(42, "walwriter".to_owned())]);
        assert_eq!(name_of(42, "postgres", &servers), "walwriter");
        assert_eq!(name_of(7, "kworker/1:1H-kblockd", &servers), "kworker/1:1H");
        assert_eq!(name_of(8, "kdamond.0", &servers), "kdamond.0");
        assert_eq!(name_of(9, "my-tool", &servers), "my-tool");
    }

    /// Two real readings of this machine around a spin of 200 ms of this thread's own CPU
    /// time (however busy the machine is, as under the test suite): the spin shows up
    /// under the bench's name, nearly all of it in user mode, and the machine was busy.
    #[test]
    fn a_busy_thread_is_found_between_two_readings() {
        let on_cpu_us = || -> u64 {
            let sched = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            crate::workload::schedstat_us(&sched).unwrap().0
        };
        let before = Snapshot::take().unwrap();
        let start = on_cpu_us();
        let mut x = 0u64;
        while on_cpu_us() - start < 200_000 {
            // Long enough between two reads of `schedstat` (a system call) that the spin
            // stays in user mode, optimised or not.
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let after = Snapshot::take().unwrap();
        let c = census(&before, &after, &HashMap::new());
        let busy: f64 = c
            .machine
            .iter()
            .filter(|(name, _)| name == "user" || name == "system")
            .map(|(_, pct)| pct)
            .sum();
        assert!(busy > 0.0, "{}", c.describe(5));
        let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        let mine = c
            .threads
            .iter()
            .find(|t| t.name == format!("bench: {}", comm.trim()))
            .unwrap_or_else(|| panic!("{comm:?} not in {}", c.describe(50)));
        let seconds_on_cpu = mine.on_cpu_pct * c.seconds / 100.0;
        assert!(
            seconds_on_cpu >= 0.2,
            "{seconds_on_cpu} s: {}",
            c.describe(5)
        );
        // A spin in user mode: little of it in the kernel.
        assert!(mine.kernel_pct < mine.on_cpu_pct / 2.0, "{}", c.describe(5));
    }
}
