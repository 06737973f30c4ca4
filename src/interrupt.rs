//! SIGINT/SIGTERM: the first one asks the work loop to stop after the open batch; a
//! second one ends the process at once (PostgreSQL rolls back the open transaction).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::exit::{Exit, fail};

#[derive(Clone, Default)]
pub struct Interrupt {
    flag: Arc<AtomicBool>,
}

impl Interrupt {
    /// Install the handlers for this process.
    pub fn install() -> Result<Interrupt> {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Order matters: the conditional shutdown sees the flag before the first
            // signal sets it, so only a second signal terminates.
            signal_hook::flag::register_conditional_shutdown(
                sig,
                Exit::Interrupted.code() as i32,
                Arc::clone(&flag),
            )
            .context("installing the signal handler")?;
            signal_hook::flag::register(sig, Arc::clone(&flag))
                .context("installing the signal handler")?;
        }
        Ok(Interrupt { flag })
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Fail with [`Exit::Interrupted`] if a stop was requested.
    pub fn check(&self, resume_hint: &str) -> Result<()> {
        if self.requested() {
            return Err(fail(
                Exit::Interrupted,
                format!("interrupted; all committed work is kept. {resume_hint}"),
            ));
        }
        Ok(())
    }
}
