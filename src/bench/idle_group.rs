//! `--idle-group-ours`: our backfill's server process, and the bench thread that is its
//! client, in a CPU control group of their own marked idle (`cpu.idle = 1`, Linux 5.15
//! or later) while our backfill runs.
//!
//! `--idle-ours` put the two under `SCHED_IDLE`, but only inside the group the kernel
//! schedules them in: the server process's session (autogroups, see `nice.rs`), which
//! keeps its normal weight; where the kernel compares that group with Hydra's processes'
//! groups, nothing is idle, and a woken Hydra process placed next to ours still waited
//! for the tick (BENCHMARKS, "Hydra's writes wait on the CPU our backfill is about to
//! take back"). An idle *group* is idle where the groups meet: a CPU running only its
//! processes counts as free when the kernel places a woken process, and any normal
//! process woken there preempts ours at once. (Processes in a control group other than
//! the root one are not grouped by session.) Whether Hydra's writes, which have only
//! the CPU ours leaves them on this machine, then get both is what this asks (on this
//! machine they waited less for a CPU and were no faster: BENCHMARKS, "An idle CPU
//! group for our server process").
//!
//! Needs a cgroup v1 hierarchy with the `cpu` controller (whose `tasks` file moves single
//! threads) and the right to write it (root). Both threads go back to the groups they
//! were in, and the group is removed, at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The group's name under the `cpu` hierarchy's root.
const GROUP: &str = "hydra-upgrade-bench-idle";

/// The threads moved, each with the `tasks` file of the group it came from.
pub struct Grouped {
    dir: PathBuf,
    moved: Vec<(i32, PathBuf)>,
}

/// Our server process `pid` and the calling thread into an idle group.
pub fn ours(pid: i32) -> Result<Grouped> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let Some(root) = cpu_hierarchy(&mountinfo) else {
        bail!(
            "--idle-group-ours needs a cgroup v1 hierarchy with the cpu controller mounted \
             (none in /proc/self/mountinfo)"
        );
    };
    let dir = root.join(GROUP);
    if !dir.exists() {
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating {} (needs root)", dir.display()))?;
    }
    write(&dir.join("cpu.idle"), "1")?;
    // SAFETY: gettid has no preconditions.
    let client_tid = unsafe { libc::gettid() };
    let mut grouped = Grouped {
        dir,
        moved: Vec::new(),
    };
    for (tid, cgroup) in [
        (pid, format!("/proc/{pid}/cgroup")),
        (client_tid, "/proc/thread-self/cgroup".to_owned()),
    ] {
        let text = std::fs::read_to_string(&cgroup).with_context(|| format!("reading {cgroup}"))?;
        let Some(path) = cpu_cgroup(&text) else {
            bail!("{cgroup} names no cpu group");
        };
        let back = root.join(path.trim_start_matches('/')).join("tasks");
        write(&grouped.dir.join("tasks"), &tid.to_string())?;
        grouped.moved.push((tid, back));
    }
    Ok(grouped)
}

impl Grouped {
    /// Both threads back where they were, and the group removed (the server process may
    /// have ended by then, which leaves nothing to move back).
    pub fn undo(self) -> Result<()> {
        for (tid, back) in &self.moved {
            if Path::new(&format!("/proc/{tid}")).exists() {
                write(back, &tid.to_string())?;
            }
        }
        std::fs::remove_dir(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }
}

fn write(file: &Path, value: &str) -> Result<()> {
    std::fs::write(file, value)
        .with_context(|| format!("writing {value} to {} (needs root)", file.display()))
}

/// Where the cgroup v1 hierarchy holding the `cpu` controller is mounted, if it is,
/// from `/proc/self/mountinfo`'s text.
fn cpu_hierarchy(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split(' ');
        let (kind, _source, options) = (fs.next()?, fs.next()?, fs.next()?);
        // The paths in `/proc/PID/cgroup` are from the hierarchy's root, so only a mount
        // of that root will do.
        let mut mount = mount.split(' ').skip(3);
        let (root, mount_point) = (mount.next()?, mount.next()?);
        (kind == "cgroup" && root == "/" && options.split(',').any(|o| o == "cpu"))
            .then(|| PathBuf::from(mount_point))
    })
}

/// A process's group in the `cpu` hierarchy, from its `/proc/PID/cgroup` text
/// (`ID:controllers:path` lines).
fn cpu_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "cpu").then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cpu_hierarchy_among_others() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/cpuacct rw,relatime shared:14 - cgroup cgroup rw,cpuacct
36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
40 25 0:35 / /sys/fs/cgroup/unified rw,relatime shared:19 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cpu_hierarchy(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(
            cpu_hierarchy("40 25 0:35 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
            None
        );
        // A container's view of a subtree of the hierarchy.
        assert_eq!(
            cpu_hierarchy("36 25 0:31 /lxc/x /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn reads_the_cpu_group_of_a_process() {
        let text = "9:name=systemd:/\n2:cpuacct:/a\n1:cpu,cpuacct:/b/c\n0::/\n";
        assert_eq!(cpu_cgroup(text), Some("/b/c"));
        assert_eq!(cpu_cgroup("0::/user.slice\n"), None);
    }
}
