//! Letting Hydra's woken processes have the CPU at once (`backfill --cpu-slice-ms`).
//!
//! Linux's scheduler since 6.6 (EEVDF) gives the CPU to the runnable process with the
//! earliest virtual deadline, a process's deadline lying one time slice past its share of
//! the CPU so far. A process woken next to one of our backfill's (Hydra's commit, its
//! fsync done) has the default slice, and so often a later deadline than ours, which
//! renews itself every slice while we run: it then waits until the scheduler's next
//! tick (4 ms at HZ=250) finds ours past its deadline. Since Linux 6.12 a process may
//! ask for its own slice (`sched_setattr`, `sched_runtime` of a normal process, 0.1 to
//! 100 ms). A long slice puts our deadline far ahead, so a woken Hydra process, whose
//! deadline is nearer, preempts ours when it wakes: the backfill is throughput work and
//! says so, and Hydra's latency-bound processes go first (BENCHMARKS, "A long time slice
//! for our pair").
//!
//! Set on our session's server process and on this thread for the walk, back to the
//! kernel's default after. Only where it can work: PostgreSQL on this machine
//! ([`one_cpu::local_server_pid`]), the right to change the server process's scheduling
//! (root or the server's user), and a kernel that keeps the slice (6.12 or later; an older
//! one accepts the call and ignores it, which is read back and reported).

use std::time::Duration;

use anyhow::Result;

use super::one_cpu;
use crate::db::Db;

/// The longest and shortest slice Linux accepts (it clamps to this range).
pub const MAX: Duration = Duration::from_millis(100);
const MIN: Duration = Duration::from_micros(100);

/// The default: the longest slice the kernel grants.
pub const DEFAULT_MS: u64 = 100;

/// `struct sched_attr` as far as `SCHED_ATTR_SIZE_VER0` (48 bytes), which is all a normal
/// process's policy uses.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

fn get(tid: i32) -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as u32;
    // SAFETY: `attr` is a valid, writable `sched_attr` of `size` bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut SchedAttr,
            size,
            0u32,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `tid`'s slice, keeping its policy and niceness; 0 is the kernel's default slice.
fn set_slice(tid: i32, slice_ns: u64) -> std::io::Result<SchedAttr> {
    let mut attr = get(tid)?;
    if attr.policy != SCHED_OTHER && attr.policy != SCHED_BATCH {
        return Err(std::io::Error::other(format!(
            "it runs under scheduling policy {}, not a normal one",
            attr.policy
        )));
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    attr.flags = 0;
    attr.runtime = slice_ns;
    // SAFETY: `attr` is a valid `sched_attr` of `attr.size` bytes, read from the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const SchedAttr,
            0u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    get(tid)
}

/// Our server process and this thread with a long slice; dropping it gives both the
/// kernel's default back.
#[derive(Debug)]
pub struct Sliced {
    pub server_pid: i32,
    pub slice: Duration,
    thread: i32,
}

impl Drop for Sliced {
    fn drop(&mut self) {
        // The session may have ended (its process with it); nothing to give back then.
        let _ = set_slice(self.server_pid, 0);
        let _ = set_slice(self.thread, 0);
    }
}

/// Ask for `slice` (clamped to what Linux accepts) for our server process and the calling
/// thread, or say why not (`Err` only for a failed query).
pub fn set(db: &mut Db, slice: Duration) -> Result<std::result::Result<Sliced, String>> {
    let pid = match one_cpu::local_server_pid(db)? {
        Ok(pid) => pid,
        Err(why) => return Ok(Err(why)),
    };
    Ok(set_for(pid, slice))
}

fn set_for(pid: i32, slice: Duration) -> std::result::Result<Sliced, String> {
    let want = slice.clamp(MIN, MAX).as_nanos() as u64;
    let got = set_slice(pid, want).map_err(|e| {
        format!(
            "setting the time slice of the server process (pid {pid}) was refused ({e}): that \
             needs root or the server's own user"
        )
    })?;
    // The calling thread (Linux's gettid; 0 would be the same thread, but the drop may
    // run elsewhere).
    let thread = unsafe { libc::gettid() };
    let sliced = Sliced {
        server_pid: pid,
        slice: Duration::from_nanos(want),
        thread,
    };
    if got.runtime != want {
        // Too old a kernel: it took the call and kept its own slice.
        return Err(format!(
            "this kernel keeps its own time slice ({:.1} ms asked, {:.1} ms kept): custom \
             slices need Linux 6.12 or later",
            want as f64 / 1e6,
            got.runtime as f64 / 1e6
        ));
    }
    set_slice(thread, want).map_err(|e| format!("setting our own time slice: {e}"))?;
    Ok(sliced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_is_the_kernels_first_version() {
        assert_eq!(std::mem::size_of::<SchedAttr>(), 48);
    }

    #[test]
    fn a_thread_can_ask_for_a_slice_and_give_it_back() {
        // A thread of its own, so that no other test's thread is touched.
        std::thread::spawn(|| {
            let me = unsafe { libc::gettid() };
            let before = get(me).expect("sched_getattr on this thread");
            let after = set_slice(me, 5_000_000).expect("sched_setattr on this thread");
            assert_eq!(after.policy, before.policy);
            assert_eq!(after.nice, before.nice);
            let kernel: Vec<u32> = std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .split(|c: char| !c.is_ascii_digit())
                .take(2)
                .filter_map(|n| n.parse().ok())
                .collect();
            if kernel >= vec![6, 12] {
                assert_eq!(after.runtime, 5_000_000);
            }
            let back = set_slice(me, 0).expect("back to the default");
            assert_eq!(back.runtime, before.runtime);
        })
        .join()
        .unwrap();
    }
}
