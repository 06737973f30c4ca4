//! `--pin-ours`: our backfill's server process alone on the first CPU; every other process
//! of the cluster (the writer's server process, the WAL writer, the checkpointer, ...) and
//! the bench itself (whose threads are the writer's client) on the others. A diagnostic
//! of how much of the writer's tail comes from sharing CPUs with the backfill, as
//! `--nice-ours` is; `taskset` needs root or the cluster's user.

use anyhow::{Context, Result, bail};

use crate::db::Db;
use crate::exec::Cmd;

/// Processes whose CPUs were changed, to give them all CPUs back.
pub struct Pinned {
    pids: Vec<u32>,
    all: String,
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
    let rest = format!("1-{}", cpus - 1);
    // The postmaster first: what it starts from now on inherits its CPUs.
    taskset(&rest, postmaster, false)?;
    for &pid in &others {
        // A session may have ended since the query; the rest still counts.
        let _ = taskset(&rest, pid, false);
    }
    let bench = std::process::id();
    taskset(&rest, bench, true)?;
    taskset("0", ours, false)?;
    let mut pids = vec![postmaster, bench, ours];
    pids.extend(others);
    Ok(Pinned {
        pids,
        all: format!("0-{}", cpus - 1),
    })
}

impl Pinned {
    /// Every process back on every CPU (those that ended are skipped).
    pub fn undo(self) {
        for pid in self.pids {
            let _ = taskset(&self.all, pid, pid == std::process::id());
        }
    }
}

fn taskset(cpus: &str, pid: u32, all_threads: bool) -> Result<()> {
    let mut cmd = Cmd::new("taskset");
    if all_threads {
        cmd = cmd.arg("-a");
    }
    cmd.args(["-p", "-c", cpus, &pid.to_string()]).run()?;
    Ok(())
}

/// The parent of `pid` (field 4 of `/proc/PID/stat`, after the parenthesised name).
fn parent(pid: u32) -> Result<u32> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no parent pid in {path}: {stat}"))
}
