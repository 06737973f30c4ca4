//! The command line: clap definitions only, no logic.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "hydra-upgrade",
    version,
    about = "Carry a Hydra through its two-phase jobset_id schema upgrade, online and resumable"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line of this process, with every exit code listed under `--help`
    /// (from [`crate::exit::Exit::ALL`], so the list cannot fall behind).
    pub fn parse_with_exit_codes() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command()
            .after_help(crate::exit::Exit::help_text())
            .get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

#[derive(Debug, Args)]
pub struct Global {
    /// Database: libpq URL or keyword string, or Hydra's DBI string
    /// (dbi:Pg:dbname=hydra;user=hydra;host=...;port=...). Default: $HYDRA_DBI, then the
    /// config file's "db".
    #[arg(long, global = true, value_name = "DSN")]
    pub db: Option<String>,

    /// Machine-readable output: one JSON document (status, plan, verify, summaries) or
    /// JSON lines of events (backfill progress).
    #[arg(long, global = true)]
    pub json: bool,

    /// Configuration file written by the NixOS module. Default: $HYDRA_UPGRADE_CONFIG when
    /// set and not empty, else /etc/hydra-upgrade/config.json.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Where the configuration file is when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/hydra-upgrade/config.json";

impl Global {
    /// `--config`, else a non-empty `$HYDRA_UPGRADE_CONFIG`, else [`DEFAULT_CONFIG`] (an
    /// empty variable counts as unset, as libpq treats its own).
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .or_else(|| {
                std::env::var_os("HYDRA_UPGRADE_CONFIG")
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Where the upgrade stands, read from the database alone.
    Status {
        /// Count NULL rows exactly (a full scan of Jobs and Builds) instead of estimating.
        #[arg(long)]
        exact: bool,
    },
    /// What `upgrade` would do next; changes nothing.
    Plan,
    /// Fill Jobs.jobset_id and Builds.jobset_id online, in short resumable batches.
    Backfill(BackfillCmd),
    /// Prove nothing is left: exact NULL, orphan and wrong jobset_id counts, with samples.
    Verify,
    /// Carry out the effect of upgrade-62..65 online (no long write-blocking lock on
    /// PostgreSQL 12 and later) and record schema 65, so the final package's hydra-init
    /// has nothing left to do.
    Finalize(FinalizeArgs),
    /// Run the whole upgrade on a throwaway PostgreSQL: synthetic data by default, or a
    /// copy of production (--from-dump / --from-db). Reports durations and lock times.
    Rehearse(RehearseArgs),
    /// Run the whole upgrade, in order, to the end.
    Upgrade(UpgradeArgs),
    /// WAL segments for the backfill, as a PostgreSQL superuser: `prepare` before it,
    /// `reset` after.
    Wal {
        #[command(subcommand)]
        action: WalAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum WalAction {
    /// Raise min_wal_size, max_wal_size and checkpoint_timeout for the backfill (ALTER
    /// SYSTEM, recorded in postgresql.auto.conf), and have PostgreSQL create the WAL
    /// segments the backfill will write into now, one at a time.
    Prepare {
        /// Pause after each segment: Hydra's commits wait while one is created.
        #[arg(long, value_name = "MS", default_value_t = 100)]
        pause_ms: u64,
    },
    /// Put back what `wal prepare` changed, where nobody changed it since.
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyChoice {
    /// per-page unless something defeats HOT updates, then keyset.
    Auto,
    /// Few rows per heap page per transaction, many pages: HOT updates, little bloat.
    PerPage,
    /// Consecutive primary-key ranges: the plain fallback.
    Keyset,
}

/// The largest batch size accepted: Builds' ids are 32-bit, and the keyset cursor does its
/// arithmetic in `i64` (a larger value would wrap).
const BATCH_SIZE_MAX: u64 = i32::MAX as u64;

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Batch selection strategy. Default: the configuration file's `backfill.strategy`,
    /// else `auto`.
    #[arg(long, value_enum)]
    pub strategy: Option<StrategyChoice>,
    /// Target duration of one batch transaction; the batch size adapts towards it.
    /// Default: the configuration file's `backfill.target_batch_ms`, else 20.
    #[arg(long, value_name = "MS")]
    pub target_batch_ms: Option<u64>,
    /// Pause between batches (throttle). Default: the configuration file's
    /// `backfill.pause_ms`, else 0.
    #[arg(long, value_name = "MS")]
    pub pause_ms: Option<u64>,
    /// First batch size (keys for keyset, heap pages for per-page).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=BATCH_SIZE_MAX))]
    pub batch_size: Option<u64>,
    /// Largest batch size the adaptation may reach.
    #[arg(long, value_name = "N", default_value_t = 50_000,
          value_parser = clap::value_parser!(u64).range(1..=BATCH_SIZE_MAX))]
    pub max_batch_size: u64,
    /// lock_timeout for every statement (SQLSTATE 55P03 is retried).
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    pub lock_timeout_ms: u64,
    /// statement_timeout for every statement (a timed-out batch is halved and retried).
    #[arg(long, value_name = "MS", default_value_t = 120_000)]
    pub statement_timeout_ms: u64,
    /// How often one batch is retried on lock timeout, deadlock or serialization failure.
    #[arg(long, value_name = "N", default_value_t = 12)]
    pub max_retries: u32,
    /// A transaction that has written, open longer than this anywhere in the cluster, or
    /// a snapshot as old in this database (in any database before PostgreSQL 14) keeps
    /// dead rows from being pruned; `auto` then uses keyset and the run warns about it.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub horizon_age_secs: u64,
    /// Per-page: before each round, wait up to this long for sessions whose snapshot (an
    /// autovacuum ANALYZE) or whose transaction idle after a write is older than the
    /// previous round to end, so its rows can stay on their pages (HOT). 0 never waits.
    #[arg(long, value_name = "MS", default_value_t = 2_000)]
    pub horizon_wait_ms: u64,
    /// Keep this tool and its PostgreSQL server process on one CPU (`auto`: of those both
    /// may use, the one serving the fewest device interrupts), so that Hydra's processes
    /// keep the others: on a machine with few CPUs they otherwise wait, a scheduler tick
    /// at a time, on the CPU the backfill is about to take back. Only with PostgreSQL on
    /// this machine, 2 or more CPUs, and the right to set the server process's CPUs (root
    /// or the server's user); else the backfill runs unpinned and says why. `off`, or a
    /// CPU number. Default: the configuration file's `backfill.pin_cpu`, else `auto`.
    #[arg(long, value_name = "auto|off|CPU")]
    pub pin_cpu: Option<crate::backfill::one_cpu::PinCpu>,
    #[command(flatten)]
    pub replication: ReplicationArgs,
}

/// The `backfill` command: the knobs, and where `upgrade` wants the report of a backfill
/// it runs in a unit of its own.
#[derive(Debug, Clone, Args)]
pub struct BackfillCmd {
    #[command(flatten)]
    pub knobs: BackfillArgs,
    /// Also write the final report as JSON to this file, once the backfill has ended
    /// (`upgrade` reads it from its backfill unit).
    #[arg(long, value_name = "PATH", hide = true)]
    pub report_file: Option<PathBuf>,
}

// The watch on standbys, shared by the backfill and the final phase (a plain comment: a
// doc comment here would become the help text of a command it is flattened into).
#[derive(Debug, Clone, Args)]
pub struct ReplicationArgs {
    /// Wait, between transactions (the backfill) and before each step that reads or writes
    /// a whole table (the final phase), while a standby or logical subscriber streaming
    /// from this server has more than this much of its WAL not yet stored
    /// (`pg_stat_replication`), until it is within half of it: a standby left far behind
    /// fills the primary's `pg_wal` (with a slot) or has to be cloned again (without). 0
    /// never waits. At least two WAL segments. Default: the configuration file's
    /// `backfill.max_replication_lag_mb`, else 128.
    #[arg(long, value_name = "MB")]
    pub max_replication_lag_mb: Option<u64>,
    /// End the run (exit 17, resumable) when the standby or subscriber it waits for has
    /// stored no WAL for this long, across its reconnections: waiting for ever would hold
    /// the upgrade, going on would pile our WAL up behind it. 0 waits however long it
    /// takes.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::backfill::replication::DEFAULT_STALL_SECS)]
    pub replication_stall_secs: u64,
}

impl BackfillArgs {
    /// The knobs as the command line gives them when none is set.
    pub fn defaults() -> BackfillArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            backfill: BackfillArgs,
        }
        Only::parse_from(["hydra-upgrade"]).backfill
    }
}

#[derive(Debug, Clone, Args)]
pub struct FinalizeArgs {
    /// lock_timeout for each short ACCESS EXCLUSIVE step (retried with backoff).
    #[arg(long, value_name = "MS", default_value_t = crate::finalize::DEFAULT_LOCK_TIMEOUT_MS)]
    pub lock_timeout_ms: u64,
    /// How often a DDL step is retried on lock timeout.
    #[arg(long, value_name = "N", default_value_t = crate::finalize::DEFAULT_MAX_RETRIES)]
    pub max_retries: u32,
    #[command(flatten)]
    pub replication: ReplicationArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RehearseArgs {
    /// Synthetic data: number of builds.
    #[arg(long, default_value_t = 50_000)]
    pub builds: u64,
    /// Synthetic data: number of projects.
    #[arg(long, default_value_t = 60)]
    pub projects: u64,
    /// Synthetic data: number of jobsets (names shared across projects).
    #[arg(long, default_value_t = 240)]
    pub jobsets: u64,
    /// Synthetic data: number of jobs (spread over large and small jobsets).
    #[arg(long, default_value_t = 8_000)]
    pub jobs: u64,
    /// Synthetic data: seed, so a rehearsal can be repeated exactly.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rehearse on a copy of this pg_dump file (custom, directory, tar or plain SQL format).
    #[arg(long, value_name = "FILE", conflicts_with = "from_db")]
    pub from_dump: Option<PathBuf>,
    /// Rehearse on a copy of this database (dumped with pg_dump; production is only read).
    #[arg(long, value_name = "DSN")]
    pub from_db: Option<String>,
    /// Apply upgrade-62..65 as the stock hydra-init does (long locks), instead of `finalize`.
    #[arg(long)]
    pub stock_final: bool,
    #[command(flatten)]
    pub backfill: BackfillArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SwitchMode {
    /// Set the system profile and activate (like `nixos-rebuild switch`).
    Switch,
    /// Activate only; the profile and boot menu stay as they are.
    Test,
}

#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print every step and command it would run, in order, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Toplevel of the NixOS system running the hydra-migration package.
    #[arg(long, value_name = "PATH", requires = "final_system")]
    pub migration_system: Option<PathBuf>,
    /// Toplevel of the NixOS system running the final (hydra-unstable) package.
    #[arg(long, value_name = "PATH", requires = "migration_system")]
    pub final_system: Option<PathBuf>,
    /// Build both phase systems from this flake's NixOS configuration (e.g. `.#hydra`):
    /// `nixosConfigurations.<name>.config.system.build.hydraUpgrade.{migration,final}`.
    #[arg(long, value_name = "REF", conflicts_with = "migration_system")]
    pub flake: Option<String>,
    /// How each phase system is activated.
    #[arg(long, value_enum, default_value_t = SwitchMode::Switch)]
    pub mode: SwitchMode,
    /// Run every host command over SSH on this host (the database is reached with --db).
    #[arg(long, value_name = "USER@HOST")]
    pub target_host: Option<String>,
    /// Where the upgrade keeps its small state file.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Command that switches the host to the migration system (instead of the profile and
    /// switch-to-configuration), for colmena, deploy-rs, ...; run here with `sh -c`, with
    /// HYDRA_UPGRADE_PHASE and HYDRA_UPGRADE_SYSTEM set.
    #[arg(long, value_name = "CMD")]
    pub migration_switch_command: Option<String>,
    /// Command that switches the host to the final system; run with `sh -c`.
    #[arg(long, value_name = "CMD")]
    pub final_switch_command: Option<String>,
    /// Hydra's web server, for the health check.
    #[arg(long, value_name = "URL")]
    pub hydra_url: Option<String>,
    /// Let the final package's hydra-init apply upgrade-62..65 itself (long locks),
    /// instead of finishing them online with `finalize` first.
    #[arg(long)]
    pub stock_final: bool,
    /// How long to wait for hydra-init.service after a switch (the stock final phase can
    /// take hours on a large Builds table).
    #[arg(long, value_name = "SECONDS", default_value_t = 14_400)]
    pub hydra_init_timeout_secs: u64,
    /// How long Hydra may take to become healthy after a switch before rolling back.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub health_timeout_secs: u64,
    /// Run the backfill in this process instead of the transient unit
    /// hydra-upgrade-backfill (which survives a dropped SSH session).
    #[arg(long)]
    pub foreground_backfill: bool,
    /// How often host state is polled (tests use a short interval).
    #[arg(long, hide = true, value_name = "MS", default_value_t = 1_000)]
    pub poll_ms: u64,
    /// Use the simulated host: phase switches apply the schema steps as hydra-init would,
    /// directly to the database (what `rehearse` does). For rehearsals and tests only.
    #[arg(long, hide = true)]
    pub simulate_host: bool,
    #[command(flatten)]
    pub backfill: BackfillArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Batch sizes are 1 to 2^31 - 1: a 0 made no progress, and a larger value wrapped to a
    /// negative span in the keyset cursor's arithmetic.
    #[test]
    fn batch_sizes_outside_one_to_i32_max_are_refused() {
        let parse =
            |flag: &str, v: &str| Cli::try_parse_from(["hydra-upgrade", "backfill", flag, v]);
        for flag in ["--batch-size", "--max-batch-size"] {
            assert!(parse(flag, "1").is_ok(), "{flag} 1");
            assert!(parse(flag, "2147483647").is_ok(), "{flag} 2^31 - 1");
            for bad in ["0", "2147483648", "18446744073709551615"] {
                let e = parse(flag, bad).expect_err(bad);
                assert_eq!(e.exit_code(), 2, "{flag} {bad}");
            }
        }
    }
}
