//! Keeping the backfill on one CPU (`backfill --pin-cpu`, on by default).
//!
//! The backfill is two processes taking turns: this tool sends a round, PostgreSQL's
//! server process for our session runs it (tens of milliseconds of CPU), answers, and
//! waits for the next. Between turns both look idle for an instant, and on a machine with
//! few CPUs the kernel places Hydra's woken processes on whichever CPU looks free just
//! then: often the one our pair takes back a moment later. A woken process that finds one
//! of ours running there waits until the scheduler's next tick (4 ms at HZ=250) while
//! the other CPU idles. Kept on one CPU, our pair never leaves a CPU looking free that
//! it is about to reclaim, and Hydra's processes keep the others (BENCHMARKS, "Hydra's
//! writes wait on the CPU our backfill is about to take back"). The backfill uses one CPU
//! at a time anyway, so it loses nothing.
//!
//! Only where that is possible and safe: PostgreSQL on this machine (the process under the
//! pid the server reports is a `postgres` process whose title names our user and
//! database), at least two CPUs that both may use, and the right to set the server
//! process's CPUs (root, or the server's user). Otherwise the backfill runs as before and
//! says why. Both get the CPUs they had back at the end.

use std::str::FromStr;

use anyhow::{Context, Result};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::db::Db;

/// `--pin-cpu`: `auto` (of the CPUs both processes may use, the one that serves the fewest
/// device interrupts), `off`, or a CPU number. In the configuration file a string of the
/// same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum PinCpu {
    Auto,
    Off,
    Cpu(usize),
}

impl std::fmt::Display for PinCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinCpu::Auto => f.write_str("auto"),
            PinCpu::Off => f.write_str("off"),
            PinCpu::Cpu(c) => write!(f, "{c}"),
        }
    }
}

impl FromStr for PinCpu {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<PinCpu, String> {
        match s {
            "auto" => Ok(PinCpu::Auto),
            "off" => Ok(PinCpu::Off),
            n => n
                .parse()
                .map(PinCpu::Cpu)
                .map_err(|_| format!("expected auto, off or a CPU number, not {n:?}")),
        }
    }
}

impl TryFrom<String> for PinCpu {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<PinCpu, String> {
        s.parse()
    }
}

/// Our session's server process and this thread on one CPU; dropping it gives both the
/// CPUs they had.
#[derive(Debug)]
pub struct Pinned {
    pub cpu: usize,
    pub server_pid: i32,
    server_before: CpuSet,
    ours_before: CpuSet,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The session may have ended (its process with it); nothing to give back then.
        let _ = sched_setaffinity(Pid::from_raw(self.server_pid), &self.server_before);
        let _ = sched_setaffinity(Pid::from_raw(0), &self.ours_before);
    }
}

/// Pin, or say why not (`Err` only for a failed query).
pub fn pin(db: &mut Db, choice: PinCpu) -> Result<std::result::Result<Pinned, String>> {
    if choice == PinCpu::Off {
        return Ok(Err("--pin-cpu off".into()));
    }
    let row = db
        .client()
        .query_one(
            "SELECT pg_backend_pid(), current_user::text, current_database()::text",
            &[],
        )
        .context("reading the session's server process id, user and database")?;
    let (pid, user, dbname): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    Ok(pin_process(pid, &user, &dbname, choice))
}

fn pin_process(
    pid: i32,
    user: &str,
    dbname: &str,
    choice: PinCpu,
) -> std::result::Result<Pinned, String> {
    let title = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    if !is_our_server_process(&title, user, dbname) {
        return Err(format!(
            "PostgreSQL's server process for this session (pid {pid}) is not on this machine, \
             or not visible from here"
        ));
    }
    let server = Pid::from_raw(pid);
    let server_before =
        sched_getaffinity(server).map_err(|e| format!("reading its CPUs (pid {pid}): {e}"))?;
    let ours_before =
        sched_getaffinity(Pid::from_raw(0)).map_err(|e| format!("reading our CPUs: {e}"))?;
    let both: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| {
            server_before.is_set(c).unwrap_or(false) && ours_before.is_set(c).unwrap_or(false)
        })
        .collect();
    if both.len() < 2 {
        return Err(format!(
            "{} CPU(s) usable by both this tool and the server process: none would be left \
             to Hydra",
            both.len()
        ));
    }
    let cpu = match choice {
        PinCpu::Cpu(c) if both.contains(&c) => c,
        PinCpu::Cpu(c) => {
            return Err(format!(
                "CPU {c} is not one both this tool and the server process may use ({both:?})"
            ));
        }
        _ => auto_cpu(&both),
    };
    let mut one = CpuSet::new();
    one.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    sched_setaffinity(server, &one).map_err(|e| {
        format!(
            "setting the CPUs of the server process (pid {pid}) was refused ({e}): that needs \
             root or the server's own user"
        )
    })?;
    if let Err(e) = sched_setaffinity(Pid::from_raw(0), &one) {
        let _ = sched_setaffinity(server, &server_before);
        return Err(format!("setting our own CPUs: {e}"));
    }
    Ok(Pinned {
        cpu,
        server_pid: pid,
        server_before,
        ours_before,
    })
}

/// The CPU `auto` takes of `cpus` (not empty): [`quietest`] by this machine's
/// `/proc/interrupts`.
pub fn auto_cpu(cpus: &[usize]) -> usize {
    quietest(
        cpus,
        &std::fs::read_to_string("/proc/interrupts").unwrap_or_default(),
    )
}

/// Of `cpus`, the one that has served the fewest device interrupts (the numbered lines
/// of `/proc/interrupts`: disks, network), the lowest on a tie. A Hydra commit waits for
/// its WAL to reach the disk, and the process is woken where the disk's interrupt lands:
/// on a 2-CPU machine whose disk interrupts all go to one CPU, our pair on that CPU left
/// Hydra's writes slower than on the other (BENCHMARKS).
fn quietest(cpus: &[usize], interrupts: &str) -> usize {
    let mut lines = interrupts.lines();
    let columns: Vec<Option<usize>> = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|c| c.strip_prefix("CPU").and_then(|n| n.parse().ok()))
        .collect();
    let mut served = vec![0u64; columns.len()];
    for line in lines {
        let Some((irq, counts)) = line.trim_start().split_once(':') else {
            continue;
        };
        if irq.parse::<u32>().is_err() {
            continue;
        }
        for (i, n) in counts.split_whitespace().take(columns.len()).enumerate() {
            served[i] += n.parse::<u64>().unwrap_or(0);
        }
    }
    let of = |cpu: usize| {
        columns
            .iter()
            .position(|&c| c == Some(cpu))
            .map_or(0, |i| served[i])
    };
    cpus.iter()
        .copied()
        .min_by_key(|&c| (of(c), c))
        .expect("at least one CPU")
}

/// A server process's title is `postgres: [cluster: ]USER DATABASE HOST ACTIVITY`.
fn is_our_server_process(title: &str, user: &str, dbname: &str) -> bool {
    title.starts_with("postgres:") && title.contains(&format!(" {user} {dbname} "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_cpu_parses_auto_off_and_numbers() {
        assert_eq!("auto".parse::<PinCpu>(), Ok(PinCpu::Auto));
        assert_eq!("off".parse::<PinCpu>(), Ok(PinCpu::Off));
        assert_eq!("3".parse::<PinCpu>(), Ok(PinCpu::Cpu(3)));
        assert!("first".parse::<PinCpu>().is_err());
        assert!("-1".parse::<PinCpu>().is_err());
        for p in [PinCpu::Auto, PinCpu::Off, PinCpu::Cpu(1)] {
            assert_eq!(p.to_string().parse::<PinCpu>(), Ok(p));
        }
    }

    #[test]
    fn auto_takes_the_cpu_with_the_fewest_device_interrupts() {
        let interrupts = "           CPU0       CPU1       CPU2
  0:         10          0          0   IO-APIC   2-edge      timer
 24:          1          0          0   IO-APIC   5-edge      ACPI:Ged
 29:          0    9000000        200   PCI-MSIX  virtio1-req.0
 30:       5000          0         10   PCI-MSIX  virtio2-input.0
NMI:          0          0          0   Non-maskable interrupts
LOC:   99999999          1          1   Local timer interrupts
";
        assert_eq!(quietest(&[0, 1, 2], interrupts), 2);
        assert_eq!(quietest(&[0, 1], interrupts), 0);
        assert_eq!(quietest(&[1], interrupts), 1);
        // Unreadable, or a CPU it does not list: the lowest.
        assert_eq!(quietest(&[3, 1], ""), 1);
        assert_eq!(quietest(&[1, 2], "CPU0\n 5: 7\n"), 1);
    }

    #[test]
    fn the_server_process_is_recognised_by_its_title() {
        let t = "postgres: hydra hydra [local] UPDATE ";
        assert!(is_our_server_process(t, "hydra", "hydra"));
        let named = "postgres: main: hydra hydra 10.0.0.2(51234) idle ";
        assert!(is_our_server_process(named, "hydra", "hydra"));
        assert!(!is_our_server_process(t, "hydra", "hydra_copy"));
        assert!(!is_our_server_process(t, "postgres", "hydra"));
        // The postmaster, or any other program.
        assert!(!is_our_server_process(
            "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql ",
            "hydra",
            "hydra"
        ));
        assert!(!is_our_server_process("", "hydra", "hydra"));
    }

    #[test]
    fn a_process_that_is_not_a_server_process_is_left_alone() {
        // This test's own process: not a PostgreSQL server process.
        let why =
            pin_process(std::process::id() as i32, "hydra", "hydra", PinCpu::Auto).unwrap_err();
        assert!(why.contains("not on this machine"), "{why}");
    }
}
