//! `--slice-ours MS`: our backfill's server process, and the bench thread that is its
//! client, with their own scheduler time slice while our backfill runs (Linux 6.12 or
//! later: `sched_setattr` with the `sched_runtime` of a normal process, 0.1 to 100 ms).
//!
//! Linux's scheduler (EEVDF, since 6.6) runs the runnable process with the earliest
//! virtual deadline, one slice past its fair share so far. A process woken next to one of
//! ours with the default slice can have a later deadline than ours, and then waits for
//! the next scheduler tick (4 ms at HZ=250); with a long slice for ours, its deadline is
//! the nearer one and it preempts ours on waking. Whether Hydra's writes wait for a CPU
//! *that way* is what this diagnostic asks (BENCHMARKS, "A long time slice for our
//! pair"). Like `--nice-ours` and `--idle-ours`, it needs root or the cluster's user.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// `libc::sched_attr` is the kernel's first version (`SCHED_ATTR_SIZE_VER0`, 48 bytes),
/// all that a normal process's policy uses.
const ATTR_SIZE: u32 = std::mem::size_of::<libc::sched_attr>() as u32;

fn get(tid: i32) -> std::io::Result<libc::sched_attr> {
    // SAFETY: `sched_attr` is plain integers, for which all zeroes is a valid value.
    let mut attr: libc::sched_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `attr` is a valid, writable `sched_attr` of `ATTR_SIZE` bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut attr as *mut libc::sched_attr,
            ATTR_SIZE,
            0u32,
        )
    };
    if r == 0 {
        Ok(attr)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `tid`'s slice, keeping its policy and niceness; 0 is the kernel's default. Returns
/// the attributes read back.
fn set_slice(tid: i32, slice_ns: u64) -> std::io::Result<libc::sched_attr> {
    let mut attr = get(tid)?;
    let policy = attr.sched_policy as i32;
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return Err(std::io::Error::other(format!(
            "it runs under scheduling policy {policy}, not a normal one"
        )));
    }
    attr.size = ATTR_SIZE;
    attr.sched_flags = 0;
    attr.sched_runtime = slice_ns;
    // SAFETY: `attr` is a valid `sched_attr` of `attr.size` bytes, read from the kernel.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            tid,
            &attr as *const libc::sched_attr,
            0u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    get(tid)
}

/// The two threads given a slice, to give them the kernel's default back.
pub struct Sliced {
    server_pid: i32,
    client_tid: i32,
}

/// Give our server process `pid` and the calling thread a `slice` (clamped by the kernel
/// to 0.1-100 ms); an error if the kernel refuses it or keeps its own (before 6.12).
pub fn ours(pid: i32, slice: Duration) -> Result<Sliced> {
    let want = slice.as_nanos() as u64;
    // SAFETY: gettid has no preconditions.
    let client_tid = unsafe { libc::gettid() };
    let sliced = Sliced {
        server_pid: pid,
        client_tid,
    };
    for tid in [pid, client_tid] {
        let kept = set_slice(tid, want)
            .with_context(|| format!("setting the time slice of thread {tid}"))
            .and_then(|got| {
                if got.sched_runtime != want {
                    bail!(
                        "thread {tid} kept a {} ns time slice, not the {want} ns asked: \
                         custom slices need Linux 6.12 or later, and 100 us to 100 ms",
                        got.sched_runtime
                    );
                }
                Ok(())
            });
        if let Err(e) = kept {
            sliced.undo();
            return Err(e);
        }
    }
    Ok(sliced)
}

impl Sliced {
    /// Both back to the kernel's default slice (the server process may have ended).
    pub fn undo(self) {
        let _ = set_slice(self.server_pid, 0);
        let _ = set_slice(self.client_tid, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_is_the_kernels_first_version() {
        assert_eq!(ATTR_SIZE, 48);
    }

    #[test]
    fn a_thread_can_ask_for_a_slice_and_give_it_back() {
        // A thread of its own, so that no other test's thread is touched.
        std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            let before = get(me).expect("sched_getattr on this thread");
            let after = set_slice(me, 5_000_000).expect("sched_setattr on this thread");
            assert_eq!(
                (after.sched_policy, after.sched_nice),
                (before.sched_policy, before.sched_nice)
            );
            // Kept (Linux 6.12 on), or taken and ignored by an older kernel.
            assert!(
                after.sched_runtime == 5_000_000 || after.sched_runtime == before.sched_runtime,
                "{}",
                after.sched_runtime
            );
            let back = set_slice(me, 0).expect("back to the default");
            assert_eq!(back.sched_runtime, before.sched_runtime);
        })
        .join()
        .unwrap();
    }
}
