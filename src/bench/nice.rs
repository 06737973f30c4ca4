//! `--nice-ours` and `--nice-walwriter`: a PostgreSQL server process at another niceness.
//!
//! PostgreSQL starts each of its server processes in a session of its own (`setsid`). Where
//! the kernel groups processes by session for scheduling (`kernel.sched_autogroup_enabled`,
//! on by default in most distributions' kernels and on this VM), a process's own niceness
//! only weighs it against the other processes of its session, which for a PostgreSQL
//! server process are none: two busy processes of different sessions on one CPU share it
//! half and half whatever their niceness. What weighs one session against the others is
//! its autogroup's niceness (`/proc/PID/autogroup`). So both are set: the process's own
//! niceness (what counts where the kernel does not group by session, or where a CPU cgroup
//! puts the whole server in one group) and, when the process leads its session so that its
//! autogroup holds nothing else, the autogroup's. Raising either needs root or the
//! cluster's user; lowering the process's own, or the autogroup's below 0, needs root.

use anyhow::{Context, Result};

use super::proc_stat;
use crate::exec::Cmd;

/// Whether the kernel weighs sessions against each other (autogroups) rather than
/// processes: `kernel.sched_autogroup_enabled` is 1.
pub fn autogroups_on() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
        .is_ok_and(|v| v.trim() == "1")
}

/// `pid` (and, where autogroups are on and it leads its session, its autogroup) at
/// niceness `n`.
pub fn set(pid: i32, n: i32) -> Result<()> {
    Cmd::new("renice")
        .args(["-n", &n.to_string(), "-p", &pid.to_string()])
        .run()?;
    if autogroups_on() && leads_its_session(pid)? {
        let path = format!("/proc/{pid}/autogroup");
        std::fs::write(&path, n.to_string()).with_context(|| {
            format!("setting the autogroup niceness of pid {pid} ({path}) to {n}")
        })?;
    }
    Ok(())
}

/// Whether `pid` is its session's leader.
fn leads_its_session(pid: i32) -> Result<bool> {
    Ok(proc_stat::field(pid as u32, 3, "session")? == i64::from(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the kernel's own answer, not the field `leads_its_session` reads.
    #[test]
    fn this_process_leads_its_session_or_not() {
        let me = std::process::id() as i32;
        // SAFETY: getsid(0) only reads the calling process's session id.
        let session = unsafe { libc::getsid(0) };
        assert_eq!(leads_its_session(me).unwrap(), session == me);
    }
}
