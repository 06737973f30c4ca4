//! Fields of `/proc/PID/stat`, read after the parenthesised command name (which may itself
//! hold spaces and parentheses): 0 is the state, 1 the parent, 2 the process group, 3 the
//! session, and so on (`proc(5)` numbers them from 3).

use anyhow::{Context, Result};

/// Field `n` (counted after the command name) of `pid`'s `/proc/PID/stat`; `what` names it
/// in the error.
pub fn field(pid: u32, n: usize, what: &str) -> Result<i64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    field_of(&stat, n).with_context(|| format!("no {what} in {path}: {stat}"))
}

pub(crate) fn field_of(stat: &str, n: usize) -> Option<i64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(n)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_after_the_command_name() {
        let stat = "4242 (postgres: hydra (x) ) S 100 4242 4243 0 -1 4194560 1 0 0 0";
        assert_eq!(field_of(stat, 1), Some(100));
        assert_eq!(field_of(stat, 3), Some(4243));
        assert_eq!(field_of("garbage", 3), None);
    }

    /// The kernel's own answers: in a pid namespace whose session leader lives outside
    /// it (as in some CI containers), the session reads 0 in both.
    #[test]
    fn this_process_has_the_parent_and_session_the_kernel_reports() {
        let me = std::process::id();
        // SAFETY: getppid and getsid(0) only read the calling process's ids.
        let (parent, session) = unsafe { (libc::getppid(), libc::getsid(0)) };
        assert_eq!(field(me, 1, "parent pid").unwrap(), i64::from(parent));
        assert_eq!(field(me, 3, "session").unwrap(), i64::from(session));
    }
}
