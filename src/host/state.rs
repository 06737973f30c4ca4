//! The small state file that must outlive the tool (`<state_dir>/state.json`): resolved
//! system paths, the step reached, the system to roll back to during a switch, timings.
//! The database stays the source of truth for the schema; this file only remembers what
//! the database cannot (which systems, and where a switch was when we were stopped).
//! Written atomically: a temporary file in the same directory, fsync, rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::exit::{Exit, fail};

pub const DEFAULT_DIR: &str = "/var/lib/hydra-upgrade";
pub const FILE: &str = "state.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
    /// Seconds since the Unix epoch when the step ended.
    pub finished_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// The database, as `Dsn::describe` shows it (never a password).
    pub database: String,
    pub migration_system: Option<PathBuf>,
    pub final_system: Option<PathBuf>,
    /// The step being worked on or last reached (`preflight`, `switch-migration`,
    /// `backfill`, `verify`, `finalize`, `switch-final`, `done`).
    pub step: String,
    /// While a switch is under way: the phase and the system that ran before it, so a
    /// re-run after an interruption still knows where to roll back to.
    pub switching_to: Option<String>,
    pub previous_system: Option<PathBuf>,
    /// The system the host ran before the first switch to the migration system.
    pub before_upgrade: Option<PathBuf>,
    /// The system the host ran after the last successful switch, per phase.
    pub switched_migration: Option<PathBuf>,
    pub switched_final: Option<PathBuf>,
    /// The phase whose switch was last rolled back, until a switch is confirmed.
    pub rolled_back_from: Option<String>,
    pub started_at: u64,
    pub updated_at: u64,
    pub timings: Vec<StepTiming>,
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The state file of one directory. `dir == None` (dry run) keeps the state in memory.
#[derive(Debug)]
pub struct StateFile {
    dir: Option<PathBuf>,
    pub state: State,
}

impl StateFile {
    pub fn in_memory() -> StateFile {
        StateFile {
            dir: None,
            state: State::default(),
        }
    }

    /// Open (creating the directory) and read the file if there is one.
    pub fn open(dir: &Path) -> Result<StateFile> {
        std::fs::create_dir_all(dir).map_err(|e| {
            fail(
                Exit::Environment,
                format!(
                    "cannot create the state directory {}: {e}. Run as root, or pass \
                     --state-dir (or set state_dir in the config file) to a writable directory.",
                    dir.display()
                ),
            )
        })?;
        let path = dir.join(FILE);
        let state = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                fail(
                    Exit::Config,
                    format!(
                        "the state file {} is not valid ({e}); the database is the source of \
                         truth, so it is safe to delete it and run again.",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                started_at: now(),
                ..State::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(StateFile {
            dir: Some(dir.to_owned()),
            state,
        })
    }

    /// The state file of `dir` as it stands, for a dry run: read if it exists, never
    /// written (nor the directory made).
    pub fn read_only(dir: &Path) -> Result<StateFile> {
        let mut file = if dir.join(FILE).exists() {
            StateFile::open(dir)?
        } else {
            StateFile::in_memory()
        };
        file.dir = None;
        Ok(file)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(FILE))
    }

    /// Write the whole state atomically.
    pub fn save(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        self.state.updated_at = now();
        let path = dir.join(FILE);
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let text = serde_json::to_string_pretty(&self.state)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            fail(
                Exit::Environment,
                format!("cannot write the state file {}: {e}", path.display()),
            )
        })
    }

    /// Record the step reached and save.
    pub fn step(&mut self, step: &str) -> Result<()> {
        self.state.step = step.to_owned();
        self.save()
    }

    pub fn timing(&mut self, step: &str, seconds: f64) -> Result<()> {
        self.state.timings.push(StepTiming {
            step: step.to_owned(),
            seconds,
            finished_at: now(),
        });
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = StateFile::open(dir.path()).unwrap();
        s.state.migration_system = Some("/nix/store/x-m".into());
        s.step("switch-migration").unwrap();
        s.timing("switch-migration", 1.5).unwrap();
        let again = StateFile::open(dir.path()).unwrap();
        assert_eq!(again.state, s.state);
        assert!(!dir.path().join(".state.json.tmp").exists());
        std::fs::write(dir.path().join(FILE), "{broken").unwrap();
        let err = StateFile::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("safe to delete"));
    }
}
