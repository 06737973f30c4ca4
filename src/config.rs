//! The configuration file the NixOS module writes (`/etc/hydra-upgrade/config.json`) and
//! how the database DSN is chosen: `--db`, then `$HYDRA_DBI`, then the file's `db`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::backfill::one_cpu::PinCpu;
use crate::cli::StrategyChoice;
use crate::dsn::Dsn;
use crate::exit::{Exit, fail};

pub const DEFAULT_PATH: &str = "/etc/hydra-upgrade/config.json";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    pub strategy: Option<StrategyChoice>,
    pub target_batch_ms: Option<u64>,
    pub pause_ms: Option<u64>,
    /// `backfill --pin-cpu`: `"auto"`, `"off"` or a CPU number (as a string).
    pub pin_cpu: Option<PinCpu>,
    pub max_replication_lag_mb: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub db: Option<String>,
    pub migration_system: Option<PathBuf>,
    pub final_system: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub hydra_url: Option<String>,
    pub backfill: Option<BackfillConfig>,
}

impl Config {
    /// Read the file; a missing file at the default path is an empty configuration, a
    /// missing file anywhere else is an error (a typo must not go unnoticed).
    pub fn load(path: &Path) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) =>
            {
                return Ok(Config::default());
            }
            Err(e) => {
                return Err(fail(
                    Exit::Config,
                    format!("cannot read the configuration file {}: {e}", path.display()),
                ));
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            fail(
                Exit::Config,
                format!(
                    "the configuration file {} is not valid: {e}",
                    path.display()
                ),
            )
        })
    }

    /// The DSN to use: `--db`, then `$HYDRA_DBI`, then the file's `db`.
    pub fn dsn(&self, flag: Option<&str>) -> Result<Dsn> {
        let env = std::env::var("HYDRA_DBI").ok().filter(|v| !v.is_empty());
        let text = flag
            .map(str::to_owned)
            .or(env)
            .or_else(|| self.db.clone())
            .ok_or_else(|| {
                fail(
                    Exit::Config,
                    "no database given: pass --db (a libpq URL or Hydra's DBI string), set \
                 HYDRA_DBI as Hydra's own tools expect, or enable the NixOS module, which writes \
                 it to /etc/hydra-upgrade/config.json",
                )
            })?;
        Dsn::parse(&text)
    }
}
