//! A host whose "switch" applies the phase's schema steps exactly as that package's
//! hydra-init would: one transaction per upgrade-N.sql, SchemaVersion bumped inside it.

use std::time::Instant;

use anyhow::Result;

use super::{Host, Phase, SwitchReport};
use crate::db::Db;
use crate::dsn::Dsn;
use crate::hydra_schema::{self, FINAL_VERSION, MIGRATION_VERSION};
use crate::progress::Out;

pub struct SimulatedHost {
    dsn: Dsn,
    current: Option<Phase>,
}

impl SimulatedHost {
    pub fn new(dsn: Dsn) -> SimulatedHost {
        SimulatedHost { dsn, current: None }
    }
}

impl Host for SimulatedHost {
    fn describe(&self) -> String {
        format!(
            "simulated host (hydra-init applied directly to {})",
            self.dsn.describe()
        )
    }

    fn is_on(&mut self, phase: Phase) -> Result<bool> {
        Ok(self.current == Some(phase))
    }

    fn switch(&mut self, phase: Phase, out: &Out) -> Result<SwitchReport> {
        let start = Instant::now();
        let target = match phase {
            Phase::Migration => MIGRATION_VERSION,
            Phase::Final => FINAL_VERSION,
        };
        out.say(&format!(
            "simulated switch to {}: hydra-init brings the schema to {target}",
            phase.package()
        ));
        let mut db = Db::connect(&self.dsn)?;
        let schema_steps = hydra_schema::apply_steps(&mut db, target)?;
        self.current = Some(phase);
        Ok(SwitchReport {
            phase,
            seconds: start.elapsed().as_secs_f64(),
            schema_steps,
        })
    }

    fn check_health(&mut self, _out: &Out) -> Result<()> {
        Ok(())
    }
}
