//! SIGINT/SIGTERM: the first one asks the work loop to stop after the open batch; a
//! second one ends the process at once (PostgreSQL rolls back the open transaction).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

    /// Ask for a stop, as the first SIGINT/SIGTERM does.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Sleep for `wait`, or less: it wakes within 50 ms of a stop being asked for. True
    /// when a stop was asked for. A retry's backoff (up to 10 s) sleeps through this, so
    /// a Ctrl-C does not wait it out.
    pub fn sleep(&self, wait: Duration) -> bool {
        let end = Instant::now() + wait;
        loop {
            if self.requested() {
                return true;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleep_wakes_soon_after_a_stop_is_asked_for() {
        let interrupt = Interrupt::default();
        let other = interrupt.clone();
        let asker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            other.request();
        });
        let start = Instant::now();
        assert!(interrupt.sleep(Duration::from_secs(30)));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        asker.join().unwrap();
    }

    #[test]
    fn a_sleep_without_a_stop_lasts_its_time() {
        let interrupt = Interrupt::default();
        let start = Instant::now();
        assert!(!interrupt.sleep(Duration::from_millis(120)));
        assert!(start.elapsed() >= Duration::from_millis(120));
        assert!(!interrupt.requested());
    }
}
