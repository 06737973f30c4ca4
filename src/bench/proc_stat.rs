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

/// `/proc/meminfo`'s `key` now, in kB ([`meminfo_kb`] of a fresh read; `None` if the file
/// or the key is missing).
pub(crate) fn meminfo_now_kb(key: &str) -> Option<i64> {
    meminfo_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// A `/proc/meminfo` line's value in kB (`key` without its colon), from that file's text.
pub(crate) fn meminfo_kb(meminfo: &str, key: &str) -> Option<i64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_values_are_read_by_their_whole_key() {
        let m = "MemTotal:       24684084 kB\nFileHugePages:   1046528 kB\nFilePmdMapped:         0 kB\n";
        assert_eq!(meminfo_kb(m, "MemTotal"), Some(24_684_084));
        assert_eq!(meminfo_kb(m, "FileHugePages"), Some(1_046_528));
        assert_eq!(meminfo_kb(m, "FilePmd"), None);
        assert_eq!(meminfo_kb("", "MemTotal"), None);
    }

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
