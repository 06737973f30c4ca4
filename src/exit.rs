//! Exit codes: one per failure class, documented in README.md ("Exit codes").
//!
//! Code that knows *why* something failed wraps it in a [`Failure`]; `main` walks the
//! error chain and exits with the first failure's code (1 when there is none).

use std::fmt;
use std::process::ExitCode;

/// Every way hydra-upgrade can end. The numbers are part of the interface: scripts,
/// systemd units and the NixOS VM test rely on them. Never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, or nothing to do.
    Ok = 0,
    /// An unexpected error (a bug, or a database error of no known class).
    Internal = 1,
    /// Bad command-line usage (clap uses this code too).
    Usage = 2,
    /// The configuration is unusable: malformed DSN or config file, missing option.
    Config = 3,
    /// The database server could not be reached or refused us (auth, missing database).
    Connect = 4,
    /// The database is not a Hydra database.
    NotHydra = 5,
    /// The catalog contradicts `SchemaVersion` (for example version 61 without the columns).
    SchemaMismatch = 6,
    /// `verify` found NULL, orphan or wrong `jobset_id` rows: the final phase is refused.
    RowsLeft = 7,
    /// Another hydra-upgrade holds the database's upgrade lock.
    Locked = 8,
    /// The command does not apply at this stage of the upgrade.
    WrongPhase = 9,
    /// A host step failed and the previous system was restored.
    RolledBack = 10,
    /// A host step failed and could not be rolled back (or a rollback failed).
    HostFailed = 11,
    /// The local environment lacks something (PostgreSQL binaries for `rehearse`, ...).
    Environment = 12,
    /// The operator declined at the confirmation prompt.
    Declined = 13,
    /// Lock contention: a batch or DDL step still failed after every retry.
    RetriesExhausted = 14,
    /// The PostgreSQL server is older than the oldest version supported (and tested).
    UnsupportedServer = 15,
    /// The database role lacks a privilege a step needs (SQLSTATE 42501).
    Privilege = 16,
    /// A standby or subscriber the backfill or finalize waited for stored nothing for too
    /// long.
    ReplicationStalled = 17,
    /// Stopped by SIGINT/SIGTERM after finishing or rolling back the open batch, or by a
    /// statement of ours cancelled on the server (`pg_cancel_backend`).
    Interrupted = 130,
}

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// One line per code, for `--help` and the README table.
    pub const ALL: [(Exit, &'static str); 19] = [
        (Exit::Ok, "done, or nothing to do"),
        (Exit::Internal, "unexpected error"),
        (Exit::Usage, "bad command-line usage"),
        (Exit::Config, "unusable configuration (DSN, config file)"),
        (
            Exit::Connect,
            "database unreachable, refused the login, or the connection was lost",
        ),
        (Exit::NotHydra, "not a Hydra database"),
        (Exit::SchemaMismatch, "catalog contradicts SchemaVersion"),
        (Exit::RowsLeft, "NULL/orphan/wrong jobset_id rows remain"),
        (Exit::Locked, "another hydra-upgrade is running"),
        (Exit::WrongPhase, "command does not apply at this stage"),
        (
            Exit::RolledBack,
            "host step failed, previous system restored",
        ),
        (Exit::HostFailed, "host step failed, not rolled back"),
        (Exit::Environment, "local environment lacks something"),
        (
            Exit::Declined,
            "declined at the confirmation prompt (or no terminal and no --yes)",
        ),
        (
            Exit::RetriesExhausted,
            "lock contention outlasted every retry",
        ),
        (
            Exit::UnsupportedServer,
            "PostgreSQL server too old (before 10)",
        ),
        (Exit::Privilege, "the database role lacks a privilege"),
        (
            Exit::ReplicationStalled,
            "a standby the backfill or finalize waited for stopped catching up; re-run to resume",
        ),
        (Exit::Interrupted, "interrupted; re-run to resume"),
    ];

    /// The exit codes for `--help`, one per line (from [`Exit::ALL`]).
    pub fn help_text() -> String {
        let mut s = String::from("Exit codes (README.md, \"Exit codes\"):");
        for (exit, what) in Exit::ALL {
            s.push_str(&format!("\n  {:>3}  {what}", exit.code()));
        }
        s
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e.code())
    }
}

/// An error that knows its exit code. The message says what failed, why, and what the
/// admin can do next.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Shorthand: `return Err(fail(Exit::Config, "..."))`.
pub fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    Failure::new(exit, message).into()
}

/// The exit code an error maps to: the outermost [`Failure`] wins, whether it is the
/// error itself, a context added to it (`e.context(Failure::new(..))`, which the error
/// chain does not show as a `Failure`) or a source further down; a lost database
/// connection is [`Exit::Connect`] (committed work is kept; a re-run resumes).
pub fn exit_of(err: &anyhow::Error) -> Exit {
    if let Some(f) = err
        .downcast_ref::<Failure>()
        .or_else(|| err.chain().find_map(|e| e.downcast_ref::<Failure>()))
    {
        return f.exit;
    }
    if lost_connection(err) {
        return Exit::Connect;
    }
    match crate::db::sqlstate(err) {
        Some(c) if c == postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => Exit::Privilege,
        // A statement of ours cancelled on the server (57014) that no code of ours took as
        // its own statement_timeout: an administrator's pg_cancel_backend, or a timeout
        // set for the role or database. Nothing is half-done; a re-run continues.
        Some(c) if c == postgres::error::SqlState::QUERY_CANCELED => Exit::Interrupted,
        _ => Exit::Internal,
    }
}

/// Did the database connection break under a statement (not: could not be opened)?
pub fn lost_connection(err: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    err.chain().any(|e| {
        // The server closed the session (57P01 admin shutdown, ...), or the socket broke
        // under a statement (reset, broken pipe, EOF).
        let closed = e.downcast_ref::<postgres::Error>().is_some_and(|e| {
            e.is_closed()
                || e.as_db_error()
                    .is_some_and(|d| d.code().code().starts_with("57P"))
        });
        let io = e.downcast_ref::<std::io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof
            )
        });
        closed || io
    })
}

/// Tell the admin why the command failed (on stderr; with `--json` also as a last JSON
/// line on stdout: `{"event":"error","exit":N,"message":..,"hint":..}`), and return its
/// exit code.
pub fn report(err: &anyhow::Error, json: bool) -> Exit {
    let code = exit_of(err);
    let message = format!("{err:#}");
    crate::errln!("hydra-upgrade: error: {message}");
    let hint = hint(err, code);
    if let Some(hint) = hint {
        crate::errln!("hydra-upgrade: hint: {hint}");
    }
    if json {
        crate::outln!(
            "{}",
            serde_json::json!({"event": "error", "exit": code.code(), "message": message, "hint": hint})
        );
    }
    code
}

/// What the admin can do next, for failures whose message comes from PostgreSQL (or
/// from the broken socket) rather than from us.
fn hint(err: &anyhow::Error, exit: Exit) -> Option<&'static str> {
    match exit {
        Exit::Connect if lost_connection(err) => Some(
            "the connection to the database broke midway; every committed batch is kept. \
             Once the server answers again, run the same command to continue where it stopped.",
        ),
        Exit::Interrupted if crate::db::is_statement_timeout(err) => Some(
            "PostgreSQL cancelled a statement of ours before it ended: an administrator's \
             pg_cancel_backend, a statement_timeout set for the role or the database (`SHOW \
             statement_timeout` as that role), or a --statement-timeout-ms too small for this \
             server. Every committed step is kept; run the same command again to continue.",
        ),
        Exit::Privilege => Some(
            "connect as the role that owns Hydra's tables (`hydra` on NixOS, where root \
             reaches it through the hydra-users ident map; elsewhere put user=... in the DSN). \
             `status`, `plan` and `verify` only read; `backfill`, `finalize` and `upgrade` \
             also update Jobs and Builds, keep their progress in a `hydra_upgrade` schema \
             and alter both tables.",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_socket_is_a_connection_failure() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let err = anyhow::Error::new(io).context("running a keyset batch on Builds");
        assert_eq!(exit_of(&err), Exit::Connect);
        let other = anyhow::anyhow!("something else");
        assert_eq!(exit_of(&other), Exit::Internal);
        let failure = fail(Exit::RowsLeft, "rows left").context("outer");
        assert_eq!(exit_of(&failure), Exit::RowsLeft);
    }

    #[test]
    fn every_exit_code_is_in_the_readme_table_and_in_help() {
        let readme = include_str!("../README.md");
        let help = Exit::help_text();
        for (exit, _) in Exit::ALL {
            let row = format!("\n| {} | ", exit.code());
            assert!(
                readme.contains(&row),
                "README's table lacks {}",
                exit.code()
            );
            assert!(
                help.contains(&format!(" {}  ", exit.code())),
                "--help lacks {}",
                exit.code()
            );
        }
        let rows = readme
            .lines()
            .filter(|l| {
                l.strip_prefix("| ")
                    .and_then(|r| r.split(' ').next())
                    .is_some_and(|n| n.parse::<u8>().is_ok())
            })
            .count();
        assert_eq!(
            rows,
            Exit::ALL.len(),
            "README documents codes that do not exist"
        );
    }

    #[test]
    fn a_failure_added_as_context_sets_the_exit_code() {
        // As `with_retries` and finalize's lock steps report exhausted retries.
        let io = std::io::Error::other("canceling statement due to lock timeout");
        let err = anyhow::Error::new(io)
            .context(Failure::new(Exit::RetriesExhausted, "still failed"))
            .context("outer");
        assert_eq!(exit_of(&err), Exit::RetriesExhausted);
        let only_a_context = anyhow::anyhow!("root").context(Failure::new(Exit::Locked, "locked"));
        assert_eq!(exit_of(&only_a_context), Exit::Locked);
    }
}
