//! Our server process in an idle CPU control group (`backfill --idle-group`, on by
//! default).
//!
//! Kept on one CPU ([`super::one_cpu`]), our pair no longer leaves a CPU looking free that
//! it is about to take back, but that CPU is then theirs: a Hydra process the kernel wakes
//! there (where its disk interrupt landed, or where it ran last) still waits behind our
//! server process for the scheduler's next tick, while on a machine with few CPUs the
//! others are busy with the rest of Hydra. Neither a niceness nor `SCHED_IDLE` for the
//! server process changes that: both only weigh it inside the group the kernel schedules
//! it in (its session's, see BENCHMARKS "Autogroups"), which keeps its full weight where
//! it meets Hydra's processes. A control group marked idle (`cpu.idle = 1`, Linux 5.15
//! or later) is idle at that level: a CPU running only its processes counts as free when
//! the kernel places a woken process, and any other process woken there preempts ours at
//! once. Our server process gets the CPU whenever Hydra's leave it, so the backfill
//! loses nothing on a machine that is not saturated (BENCHMARKS, "An idle CPU group").
//!
//! The group is created next to the server process's own group (so it meets PostgreSQL's
//! other processes and, on NixOS, the Hydra services, all in `system.slice`), holds only
//! our server process, and is removed when the backfill ends, the process moved back
//! first. Only where that is possible: PostgreSQL on this machine (checked by the caller),
//! a `cpu` controller (cgroup v1, or cgroup v2 with `cpu` enabled where the group goes),
//! and the right to create groups there (root). Otherwise the backfill runs as before and
//! says why.
//!
//! An idle group runs only when nothing else wants its CPU. On a machine kept busy for
//! hours (a Hydra that also builds locally, with every CPU taken by builds), the backfill
//! would all but stop. So a watchdog reads how long the server process waits for a CPU
//! (`run_delay` in `/proc/PID/schedstat`); once it waited more than half of the last
//! five seconds, the process goes back to its own group for the rest of the backfill,
//! and the backfill says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::progress::Out;

/// `--idle-group`: `auto` (where possible) or `off`. In the configuration file a string
/// of the same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleGroup {
    Auto,
    Off,
}

impl std::fmt::Display for IdleGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdleGroup::Auto => "auto",
            IdleGroup::Off => "off",
        })
    }
}

/// The prefix of the groups this tool creates; the rest is this tool's pid.
const PREFIX: &str = "hydra-upgrade-backfill-";

/// How often the watchdog reads the server process's waits, and over how many readings
/// it judges them.
const WATCH_EVERY: Duration = Duration::from_millis(500);
const WATCH_READINGS: usize = 10;
/// The share of wall time spent waiting for a CPU above which the process leaves.
const STARVED_SHARE: f64 = 0.5;

/// Our server process in its idle group, watched; dropping it stops the watchdog, moves
/// the process back and removes the group.
#[derive(Debug)]
pub struct Grouped {
    pub dir: PathBuf,
    pub server_pid: i32,
    back: PathBuf,
    stop: Arc<AtomicBool>,
    watchdog: Option<JoinHandle<()>>,
    /// Serialises the watchdog's move back with the one on drop.
    moved_back: Arc<Mutex<bool>>,
}

impl Drop for Grouped {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        move_back(self.server_pid, &self.back, &self.moved_back);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `pid` back into the group it came from, once.
fn move_back(pid: i32, back: &Path, moved_back: &Mutex<bool>) {
    let mut done = moved_back.lock().unwrap_or_else(|e| e.into_inner());
    // The session may have ended (its process with it); nothing to move back then.
    if !*done && Path::new(&format!("/proc/{pid}")).exists() {
        let _ = std::fs::write(back.join("cgroup.procs"), pid.to_string());
    }
    *done = true;
}

/// Time process `pid` has spent runnable but waiting for a CPU (`/proc/PID/schedstat`'s
/// second field, nanoseconds), if readable.
fn run_delay(pid: i32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Of `readings` (wall time, time waited for a CPU, both since the previous reading), the
/// share of the wall time spent waiting, once there are enough of them to judge.
fn waiting_share(readings: &[(Duration, Duration)]) -> Option<f64> {
    if readings.len() < WATCH_READINGS {
        return None;
    }
    let wall: Duration = readings.iter().map(|r| r.0).sum();
    let waited: Duration = readings.iter().map(|r| r.1).sum();
    Some(waited.as_secs_f64() / wall.as_secs_f64().max(1e-9))
}

/// Watch `pid` until `stop`; if it is starved, move it back and say so.
fn watch(pid: i32, back: PathBuf, stop: Arc<AtomicBool>, moved_back: Arc<Mutex<bool>>, out: Out) {
    let mut readings = std::collections::VecDeque::with_capacity(WATCH_READINGS);
    let (mut at, mut delay) = (Instant::now(), run_delay(pid));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(WATCH_EVERY);
        let (now, d) = (Instant::now(), run_delay(pid));
        let (Some(before), Some(after)) = (delay, d) else {
            // The process has ended, or its statistics are unreadable: nothing to judge.
            return;
        };
        if readings.len() == WATCH_READINGS {
            readings.pop_front();
        }
        readings.push_back((now - at, after.saturating_sub(before)));
        (at, delay) = (now, d);
        let share = waiting_share(readings.make_contiguous());
        if let Some(share) = share.filter(|&s| s > STARVED_SHARE) {
            move_back(pid, &back, &moved_back);
            out.event(
                "left_idle_group",
                &format!(
                    "backfill: PostgreSQL's server process (pid {pid}) waited for a CPU {:.0} % \
                     of the last {} s in its idle group: this machine is busy, so it leaves \
                     the group for the rest of the backfill and shares the CPU as usual",
                    share * 100.0,
                    (WATCH_EVERY * WATCH_READINGS as u32).as_secs()
                ),
                json!({"server_pid": pid, "waiting_share": share}),
            );
            return;
        }
    }
}

/// A `cpu` hierarchy: where it is mounted, and whether it is cgroup v2.
#[derive(Debug, PartialEq)]
struct Hierarchy {
    mount: PathBuf,
    v2: bool,
}

/// Move server process `pid` (PostgreSQL on this machine: the caller checked) into an
/// idle group of its own and watch it, or say why not.
pub fn enter(pid: i32, out: Out) -> Result<Grouped, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| format!("reading /proc/{pid}/cgroup: {e}"))?;
    let (hierarchy, path) = hierarchies(&mountinfo)
        .into_iter()
        .find_map(|h| group_of(&cgroups, h.v2).map(|p| (h, p.to_owned())))
        .ok_or("no cgroup hierarchy with the cpu controller is mounted")?;
    let own = hierarchy.mount.join(path.trim_start_matches('/'));
    // Next to the server process's own group: the level where it meets the others.
    let parent = if path == "/" {
        own.clone()
    } else {
        own.parent().map(Path::to_path_buf).unwrap_or(own.clone())
    };
    remove_stale(&parent);
    let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| {
        format!(
            "creating {} was refused ({e}): that needs root",
            dir.display()
        )
    })?;
    let mut grouped = Grouped {
        dir,
        server_pid: pid,
        back: own,
        stop: Arc::new(AtomicBool::new(false)),
        watchdog: None,
        moved_back: Arc::new(Mutex::new(false)),
    };
    let idle = grouped.dir.join("cpu.idle");
    if !idle.exists() {
        return Err(if hierarchy.v2 {
            format!(
                "the cpu controller is not enabled for the groups in {} (its \
                 cgroup.subtree_control), or Linux is older than 5.15",
                parent.display()
            )
        } else {
            "this Linux has no idle control groups (cpu.idle, 5.15 or later)".into()
        });
    }
    std::fs::write(&idle, "1").map_err(|e| format!("writing 1 to {}: {e}", idle.display()))?;
    std::fs::write(grouped.dir.join("cgroup.procs"), pid.to_string()).map_err(|e| {
        format!(
            "moving the server process (pid {pid}) into {} was refused: {e}",
            grouped.dir.display()
        )
    })?;
    let (back, stop, moved_back) = (
        grouped.back.clone(),
        grouped.stop.clone(),
        grouped.moved_back.clone(),
    );
    grouped.watchdog = Some(std::thread::spawn(move || {
        watch(pid, back, stop, moved_back, out)
    }));
    Ok(grouped)
}

/// Groups left by a run of this tool that was killed: empty once its session ended.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            // Fails, harmlessly, while a process is still in it.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// The mounted hierarchies that can hold the `cpu` controller, from
/// `/proc/self/mountinfo`'s text: cgroup v1 with `cpu` among its options, and cgroup v2
/// whose root offers `cpu`. Only mounts of a hierarchy's root: `/proc/PID/cgroup` paths
/// start there.
fn hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fs = fs.split(' ');
            let (kind, _source, options) = (fs.next()?, fs.next()?, fs.next()?);
            let mut mount = mount.split(' ').skip(3);
            let (root, point) = (mount.next()?, PathBuf::from(mount.next()?));
            if root != "/" {
                return None;
            }
            match kind {
                "cgroup" if options.split(',').any(|o| o == "cpu") => Some(Hierarchy {
                    mount: point,
                    v2: false,
                }),
                "cgroup2"
                    if std::fs::read_to_string(point.join("cgroup.controllers"))
                        .is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu")) =>
                {
                    Some(Hierarchy {
                        mount: point,
                        v2: true,
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// A process's group in the `cpu` hierarchy (v1) or the unified one (v2), from its
/// `/proc/PID/cgroup` text (`ID:controllers:path` lines; v2's is `0::path`).
fn group_of(cgroups: &str, v2: bool) -> Option<&str> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let found = if v2 {
            id == "0" && controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == "cpu")
        };
        found.then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_v1_cpu_hierarchy_among_others() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/cpuacct rw,relatime shared:14 - cgroup cgroup rw,cpuacct
36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
37 25 0:32 /lxc/x /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
40 25 0:35 / /nonexistent/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
";
        // The container's view of a subtree is not a hierarchy's root; a v2 mount whose
        // root offers no cpu controller (here: none readable) holds none.
        assert_eq!(
            hierarchies(mountinfo),
            vec![Hierarchy {
                mount: PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                v2: false
            }]
        );
    }

    #[test]
    fn reads_a_process_group_in_either_version() {
        let v1 = "9:name=systemd:/\n2:cpuacct:/a\n1:cpu,cpuacct:/b/c\n0::/\n";
        assert_eq!(group_of(v1, false), Some("/b/c"));
        assert_eq!(group_of(v1, true), Some("/"));
        let v2 = "0::/system.slice/postgresql.service\n";
        assert_eq!(group_of(v2, true), Some("/system.slice/postgresql.service"));
        assert_eq!(group_of(v2, false), None);
    }

    #[test]
    fn the_watchdog_judges_the_last_readings_only_once_it_has_enough() {
        let ms = Duration::from_millis;
        let busy = vec![(ms(500), ms(400)); WATCH_READINGS];
        assert!(waiting_share(&busy).unwrap() > STARVED_SHARE);
        assert_eq!(waiting_share(&busy[1..]), None);
        let mut mixed = vec![(ms(500), ms(10)); WATCH_READINGS];
        mixed[3] = (ms(500), ms(500));
        assert!(waiting_share(&mixed).unwrap() < STARVED_SHARE);
        // This process's own statistics are readable.
        assert!(run_delay(std::process::id() as i32).is_some());
    }

    #[test]
    fn idle_group_parses_and_prints_its_values() {
        use clap::ValueEnum;
        for g in [IdleGroup::Auto, IdleGroup::Off] {
            assert_eq!(IdleGroup::from_str(&g.to_string(), false), Ok(g));
        }
    }
}
