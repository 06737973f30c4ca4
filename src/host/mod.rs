//! The machine Hydra runs on, behind one small interface: the upgrade flow asks it to
//! activate a phase's system (which runs that package's hydra-init) and to confirm Hydra
//! is healthy. `simulated` applies the schema steps itself (rehearsals, tests).

pub mod simulated;

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

pub trait Host {
    fn describe(&self) -> String;
    /// Whether the host already runs the system of `phase`.
    fn is_on(&mut self, phase: Phase) -> Result<bool>;
    /// Activate the system of `phase` and wait until its hydra-init has finished.
    fn switch(&mut self, phase: Phase, out: &Out) -> Result<SwitchReport>;
    /// Hydra answers and its units run.
    fn check_health(&mut self, out: &Out) -> Result<()>;
}
