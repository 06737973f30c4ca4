//! `--pin-ours`: our backfill's server process alone on the first CPU; every other process
//! of the cluster (the writer's server process, the WAL writer, the checkpointer, ...) and
//! the bench itself (whose threads are the writer's client) on the others. A diagnostic
//! of how much of the writer's tail comes from sharing CPUs with the backfill, as
//! `--nice-ours` is; `taskset` needs root or the cluster's user.

use anyhow::{Context, Result, bail};

use super::proc_stat;
use crate::db::Db;
use crate::exec::Cmd;

/// Processes whose CPUs were changed, with the CPUs each had before (its
/// `Cpus_allowed_list`), to give them back.
pub struct Pinned {
    before: Vec<(u32, String)>,
}

/// Our server process `ours` (`db`'s session) on CPU 0, the rest on the others.
pub fn apart(db: &mut Db, ours: i32) -> Result<Pinned> {
    let cpus = std::thread::available_parallelism()
        .context("counting CPUs")?
        .get();
    if cpus < 2 {
        bail!("--pin-ours needs at least 2 CPUs; this machine has {cpus}");
    }
    let ours = ours as u32;
    let others: Vec<u32> = db
        .client()
        .query(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            &[],
        )?
        .iter()
        .map(|r| r.get::<_, i32>(0) as u32)
        .collect();
    let postmaster = parent(ours)?;
    let bench = std::process::id();
    let rest = format!("1-{}", cpus - 1);
    let mut pinned = Pinned { before: Vec::new() };
    // The postmaster first: what it starts from now on inherits its CPUs.
    pinned.pin(postmaster, &rest)?;
    for &pid in &others {
        // A session may have ended since the query; the rest still counts.
        let _ = pinned.pin(pid, &rest);
    }
    pinned.pin(bench, &rest)?;
    pinned.pin(ours, "0")?;
    Ok(pinned)
}

/// Process `pid` on `cpus` alone (`--walwriter-cpus`), until [`Pinned::undo`].
pub fn only(pid: u32, cpus: &str) -> Result<Pinned> {
    let mut pinned = Pinned { before: Vec::new() };
    pinned.pin(pid, cpus)?;
    Ok(pinned)
}

impl Pinned {
    /// `pid` (all its threads, for the bench itself) on `cpus`, remembering its CPUs.
    fn pin(&mut self, pid: u32, cpus: &str) -> Result<()> {
        let before = allowed_cpus(pid)?;
        taskset(cpus, pid, pid == std::process::id())?;
        self.before.push((pid, before));
        Ok(())
    }

    /// Every process back on the CPUs it had (those that ended are skipped).
    pub fn undo(self) {
        for (pid, cpus) in self.before {
            let _ = taskset(&cpus, pid, pid == std::process::id());
        }
    }
}

/// The CPUs `pid` may run on, as `taskset -c` takes them (`Cpus_allowed_list` of
/// `/proc/PID/status`).
pub fn allowed_cpus(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    cpus_allowed_list(&status).with_context(|| format!("no Cpus_allowed_list in {path}"))
}

fn cpus_allowed_list(status: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn taskset(cpus: &str, pid: u32, all_threads: bool) -> Result<()> {
    let mut cmd = Cmd::new("taskset");
    if all_threads {
        cmd = cmd.arg("-a");
    }
    cmd.args(["-p", "-c", cpus, &pid.to_string()]).run()?;
    Ok(())
}

/// The parent of `pid`.
fn parent(pid: u32) -> Result<u32> {
    let ppid = proc_stat::field(pid, 1, "parent pid")?;
    u32::try_from(ppid).with_context(|| format!("parent pid {ppid} of {pid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowed_cpus_come_from_cpus_allowed_list() {
        let status =
            "Name:\tpostgres\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\nMems_allowed_list:\t0\n";
        assert_eq!(cpus_allowed_list(status).as_deref(), Some("0-1"));
        assert_eq!(cpus_allowed_list("Name:\tx\n"), None);
        assert_eq!(cpus_allowed_list("Cpus_allowed_list:\t\n"), None);
    }

    #[test]
    fn this_process_has_allowed_cpus_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(!allowed_cpus(std::process::id()).unwrap().is_empty());
        }
    }
}
