//! `--idle-ours`: our backfill's server process, and the bench thread that is its client,
//! under the `SCHED_IDLE` policy while our backfill runs. That policy is meant to let any
//! other process woken on their CPU run first, and Linux counts a CPU running only such
//! processes as free when it places a woken process; so if Hydra's writes waited for a
//! CPU *behind our backfill*, this should shorten that wait. A diagnostic, as
//! `--nice-ours` and `--pin-ours` are; `chrt` on the server process needs root or the
//! cluster's user. Where the kernel groups processes by session (see `nice.rs`), the
//! policy only weighs our server process inside its own session's group, which keeps its
//! normal weight; `--nice-ours 19` lowers that too.

use anyhow::Result;

use crate::exec::Cmd;

/// The client thread put under `SCHED_IDLE`, to give back its normal policy.
pub struct Idled {
    client_tid: String,
}

/// Put our server process `pid` and the calling thread under `SCHED_IDLE`. The server
/// process keeps it until its session ends (each contender's session ends with it).
pub fn ours(pid: i32) -> Result<Idled> {
    chrt("--idle", &pid.to_string())?;
    // SAFETY: gettid has no preconditions.
    let client_tid = unsafe { libc::gettid() }.to_string();
    chrt("--idle", &client_tid)?;
    Ok(Idled { client_tid })
}

impl Idled {
    /// The client thread back under the normal policy (leaving `SCHED_IDLE` needs root
    /// or a nice limit that allows it; otherwise the bench stops with `chrt`'s error).
    pub fn undo(self) -> Result<()> {
        chrt("--other", &self.client_tid)
    }
}

fn chrt(policy: &str, pid: &str) -> Result<()> {
    Cmd::new("chrt").args([policy, "-p", "0", pid]).run()?;
    Ok(())
}
