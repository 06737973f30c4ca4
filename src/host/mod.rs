//! The machine Hydra runs on, behind one small interface: the upgrade flow asks it to
//! activate a phase's system (which runs that package's hydra-init) and to confirm Hydra
//! is healthy. `simulated` applies the schema steps itself (rehearsals, tests); `nixos`
//! drives a real NixOS machine (locally or over SSH).

pub mod commands;
pub mod http;
pub mod nixos;
pub mod simulated;
pub mod state;

use anyhow::Result;
use serde::Serialize;

use crate::hydra_schema::AppliedStep;
use crate::progress::Out;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The system with `pkgs.hydra-migration` (schema up to 61).
    Migration,
    /// The system with `pkgs.hydra-unstable` (schema 65 and later).
    Final,
}

impl Phase {
    pub fn package(self) -> &'static str {
        match self {
            Phase::Migration => "hydra-migration",
            Phase::Final => "hydra-unstable",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SwitchReport {
    pub phase: Phase,
    pub seconds: f64,
    /// The schema steps hydra-init applied, each one transaction holding its locks.
    pub schema_steps: Vec<AppliedStep>,
}

/// A backfill run outside this process, ended well.
#[derive(Debug, Clone)]
pub struct Detached {
    /// Its report, when it could be read back from the unit.
    pub report: Option<crate::backfill::Report>,
}

pub trait Host {
    fn describe(&self) -> String;
    /// Check, before anything changes, that the host can carry the upgrade.
    fn preflight(&mut self, _out: &Out) -> Result<()> {
        Ok(())
    }
    /// Whether the host already runs the system of `phase`.
    fn is_on(&mut self, phase: Phase) -> Result<bool>;
    /// Whether the last switch to the migration system was rolled back and the host runs
    /// neither it nor the final one. If that switch's hydra-init had added the columns,
    /// the older Hydra runs on schema 61 and writes rows without `jobset_id`. False when
    /// the host cannot tell.
    fn rolled_back_from_migration(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Whether the final switch was confirmed by an earlier run and the host has since
    /// moved on to a system of its own (neither phase system nor the one from before the
    /// upgrade, and its hydra-init has not failed): a finished upgrade, not a switch to
    /// make again. False when the host cannot tell.
    fn moved_on_from_final(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Whether the pending switch (see [`Host::pending_switch`]) got as far as changing
    /// the running system: the host no longer runs the system remembered before it.
    fn pending_switch_began(&mut self) -> Result<bool> {
        Ok(false)
    }
    /// Wait while the activation of a pending switch to `phase`, started by an earlier
    /// run, still runs in its unit (its hydra-init may hold locks on Builds for hours).
    fn await_running_switch(&mut self, _phase: Phase, _out: &Out) -> Result<()> {
        Ok(())
    }
    /// A switch an earlier run started and did not confirm (it was interrupted).
    fn pending_switch(&self) -> Option<Phase> {
        None
    }
    /// Remember what runs now (to roll back to) before switching to `phase`. The switch
    /// becomes pending (one a re-run finishes) only once [`Host::switch`] begins it.
    fn prepare_switch(&mut self, _phase: Phase, _out: &Out) -> Result<()> {
        Ok(())
    }
    /// The switch prepared by `prepare_switch` will not happen (verify refused it).
    fn abort_switch(&mut self) -> Result<()> {
        Ok(())
    }
    /// Activate the system of `phase` and wait until its hydra-init has finished. If that
    /// fails, the host rolls back itself and the error says so (exit code 10 or 11).
    fn switch(&mut self, phase: Phase, out: &Out) -> Result<SwitchReport>;
    /// Hydra answers and its units run.
    fn check_health(&mut self, out: &Out) -> Result<()>;
    /// The switch to `phase` passed every check: forget the system to roll back to.
    fn switch_confirmed(&mut self, _phase: Phase) -> Result<()> {
        Ok(())
    }
    /// A check after a switch to `phase` failed: switch back to the system that ran
    /// before, and return the error to end with (never success).
    fn roll_back(&mut self, phase: Phase, _out: &Out, why: anyhow::Error) -> anyhow::Error {
        crate::exit::fail(
            crate::exit::Exit::HostFailed,
            format!(
                "the switch to the {} package failed its checks: {why:#}; {} cannot roll back",
                phase.package(),
                self.describe()
            ),
        )
    }
    /// Remember the step reached (`seconds: None`) or its duration.
    fn record_step(&mut self, _step: &str, _seconds: Option<f64>) -> Result<()> {
        Ok(())
    }
    /// Wait for a backfill that an earlier run left running in the background.
    fn follow_running_backfill(&mut self, _out: &Out) -> Result<()> {
        Ok(())
    }
    /// Run the backfill outside this process (so a dropped session cannot stop it), or
    /// return `None` to have it run in this process.
    fn detached_backfill(&mut self, _out: &Out) -> Result<Option<Detached>> {
        Ok(None)
    }
    /// The commands a step would run on this host, for `--dry-run`.
    fn dry_run_commands(&self, step: &str) -> Vec<String> {
        vec![format!("({step} on {})", self.describe())]
    }
}
