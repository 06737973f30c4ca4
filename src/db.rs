//! The one place that opens database connections and knows PostgreSQL's error classes.
//! SQL itself lives next to the code that owns it; every statement goes through a
//! [`Db`] so that session settings, error context and retries are the same everywhere.

use std::time::Duration;

use anyhow::{Context, Result};
use postgres::error::SqlState;
use postgres::{Client, NoTls};

use crate::dsn::Dsn;
use crate::exit::{Exit, fail};

/// Key of the session advisory lock that allows one hydra-upgrade per database
/// ("hydra-up" in ASCII).
const UPGRADE_LOCK_KEY: i64 = 0x6879_6472_612d_7570;

/// How long [`Db::take_upgrade_lock_waiting`] waits for another session to let go of the
/// upgrade lock before taking it for another run at work.
pub const UPGRADE_LOCK_WAIT: Duration = Duration::from_secs(10);

/// The oldest PostgreSQL hydra-upgrade runs on: the suite runs on 10 to 15
/// (`.ci/older-postgres`); 9.x lacks what the backfill reads from `pg_stat_activity`.
pub const MIN_SERVER_VERSION: i32 = 100_000;

/// Refuse a server older than [`MIN_SERVER_VERSION`] before touching anything.
pub fn check_server_version(version: i32) -> Result<()> {
    if version >= MIN_SERVER_VERSION {
        return Ok(());
    }
    Err(fail(
        Exit::UnsupportedServer,
        format!(
            "the database server is PostgreSQL {}.{}, older than hydra-upgrade supports \
             (10 or later; tested on 10 to 15). Upgrade PostgreSQL first (on NixOS: a newer \
             services.postgresql.package and pg_upgrade of the data directory, as the NixOS \
             manual's PostgreSQL chapter describes), then run this again.",
            version / 10_000,
            version / 100 % 100
        ),
    ))
}

pub struct Db {
    client: Client,
    /// To open the session again ([`Db::reconnect`]).
    config: postgres::Config,
    described: String,
    /// `server_version_num`, read once when first asked for.
    server_version: Option<i32>,
}

impl Db {
    pub fn connect(dsn: &Dsn) -> Result<Db> {
        let described = dsn.describe();
        let client = dsn.config.connect(NoTls).map_err(|e| {
            fail(
                Exit::Connect,
                format!(
                    "cannot connect to the database ({described}): {}. Check that PostgreSQL \
                     is running and reachable, the DSN (--db, HYDRA_DBI or the config file), \
                     and the credentials (password in the DSN, PGPASSWORD or ~/.pgpass).",
                    error_text(&e)
                ),
            )
        })?;
        let mut db = Db {
            client,
            config: dsn.config.clone(),
            described,
            server_version: None,
        };
        check_server_version(db.server_version()?)?;
        Ok(db)
    }

    /// Open the session again after the server closed it (PostgreSQL restarted), trying
    /// every half second for up to `within` while it is down or starting up; a stop
    /// asked for meanwhile ends the wait. Session state is not carried over: the caller
    /// takes again what it held (the upgrade lock).
    pub fn reconnect(
        &mut self,
        within: Duration,
        interrupt: &crate::interrupt::Interrupt,
    ) -> Result<()> {
        let began = std::time::Instant::now();
        loop {
            match self.config.connect(NoTls) {
                Ok(client) => {
                    self.client = client;
                    self.server_version = None;
                    return check_server_version(self.server_version()?);
                }
                Err(e) if began.elapsed() < within => {
                    if interrupt.sleep(Duration::from_millis(500)) {
                        return Err(fail(
                            Exit::Interrupted,
                            format!(
                                "interrupted while connecting to the database ({}) again: {}",
                                self.described,
                                error_text(&e)
                            ),
                        ));
                    }
                }
                Err(e) => {
                    return Err(fail(
                        Exit::Connect,
                        format!(
                            "the server closed the connection to the database ({}), and it \
                             could not be opened again within {} s: {}. Check that PostgreSQL \
                             is running, then run the same command again.",
                            self.described,
                            within.as_secs(),
                            error_text(&e)
                        ),
                    ));
                }
            }
        }
    }

    pub fn describe(&self) -> &str {
        &self.described
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The process id of this session's server process.
    pub fn backend_pid(&mut self) -> Result<i32> {
        let row = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .context("reading the session's server process id")?;
        Ok(row.get(0))
    }

    /// The server's `server_version_num` (150004 for 15.4): a few steps use what only
    /// newer PostgreSQL has, and fall back before it.
    pub fn server_version(&mut self) -> Result<i32> {
        if let Some(v) = self.server_version {
            return Ok(v);
        }
        let row = self
            .client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .context("reading the server version")?;
        self.server_version = Some(row.get(0));
        Ok(row.get(0))
    }

    /// Session settings for online work: a short lock_timeout so we never queue behind
    /// (and in front of) Hydra's own lock requests for long, and a statement_timeout so no
    /// statement of ours runs unbounded.
    pub fn set_timeouts(
        &mut self,
        lock_timeout: Duration,
        statement_timeout: Duration,
    ) -> Result<()> {
        let sql = format!(
            "SET lock_timeout = {}; SET statement_timeout = {}",
            lock_timeout.as_millis(),
            statement_timeout.as_millis()
        );
        self.client
            .batch_execute(&sql)
            .context("setting session timeouts")
    }

    /// `synchronous_commit = off` for this session only. The backfill commits thousands of
    /// small transactions; waiting for each WAL flush would dominate its time. It is safe
    /// because every batch is idempotent (it only fills NULL jobset_id from the row's own
    /// project/jobset): a commit lost in a crash is simply redone by the next run, and no
    /// other session's durability changes.
    pub fn async_commit(&mut self) -> Result<()> {
        self.client
            .batch_execute("SET synchronous_commit = off")
            .context("setting synchronous_commit")
    }

    /// Undo [`Db::set_timeouts`] and [`Db::async_commit`]: the session's settings back to
    /// the server's (or the role's, or the connection string's).
    pub fn reset_session_settings(&mut self) -> Result<()> {
        self.client
            .batch_execute("RESET lock_timeout; RESET statement_timeout; RESET synchronous_commit")
            .context("resetting the session's timeouts and synchronous_commit")
    }

    /// A transaction with `statement_timeout` lifted, for a read of a whole table that
    /// blocks nothing but can outlast the limit meant for the backfill's short batches.
    pub fn transaction_without_statement_timeout(&mut self) -> Result<postgres::Transaction<'_>> {
        let mut tx = self.client.transaction()?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")?;
        Ok(tx)
    }

    /// Run `work`, whose session settings ([`Db::set_timeouts`], [`Db::async_commit`] or
    /// its own `SET`s) are its own, then hand the connection back with the server's: once
    /// `work` ends, finished or failed (best effort then: the connection may be what
    /// failed). `upgrade` goes on with the same connection from one step to the next.
    pub fn with_own_settings<T>(&mut self, work: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        match work(self) {
            Ok(done) => {
                self.reset_session_settings()?;
                Ok(done)
            }
            Err(e) => {
                let _ = self.reset_session_settings();
                Err(e)
            }
        }
    }

    /// Who holds the upgrade lock, if anyone: pid, application, client, connection age.
    pub fn upgrade_lock_holder(&mut self) -> Result<Option<String>> {
        let holder = self
            .client
            .query_opt(
                "SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'),
                        coalesce(extract(epoch FROM now() - a.backend_start)::bigint, 0)
                   FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.granted AND l.pid <> pg_backend_pid()
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid
                  LIMIT 1",
                &[&UPGRADE_LOCK_KEY],
            )
            .context("looking up the upgrade lock holder")?;
        Ok(holder.map(|r| {
            let (pid, app, addr, age): (i32, String, String, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            format!("pid {pid} ({app}, from {addr}, connected {age}s ago)")
        }))
    }

    /// [`Self::take_upgrade_lock`], waiting up to [`UPGRADE_LOCK_WAIT`] for its holder to
    /// let go: the session of a run that has just ended needs a moment to close on the
    /// server (a backfill unit's; ours, closed by a PostgreSQL restart; one whose tool was
    /// killed, which PostgreSQL notices only once the statement running then has ended).
    /// A holder still there after that is another run at work: [`Exit::Locked`]. A stop
    /// asked for meanwhile ends the wait.
    pub fn take_upgrade_lock_waiting(
        &mut self,
        interrupt: &crate::interrupt::Interrupt,
        out: &crate::progress::Out,
    ) -> Result<()> {
        let began = std::time::Instant::now();
        let mut said = false;
        loop {
            let e = match self.take_upgrade_lock() {
                Err(e) if crate::exit::exit_of(&e) == Exit::Locked => e,
                other => return other,
            };
            if began.elapsed() >= UPGRADE_LOCK_WAIT {
                return Err(e);
            }
            if !said {
                said = true;
                let who = self
                    .upgrade_lock_holder()?
                    .unwrap_or_else(|| "another session".into());
                out.say(&format!(
                    "the upgrade lock is held by {who}; waiting up to {} s for it to be let go",
                    UPGRADE_LOCK_WAIT.as_secs()
                ));
            }
            if interrupt.sleep(Duration::from_millis(100)) {
                return Err(e.context(crate::exit::Failure::new(
                    Exit::Interrupted,
                    "interrupted while waiting for the upgrade lock; run the same command \
                     again to continue",
                )));
            }
        }
    }

    /// Take the database-wide upgrade lock (session advisory lock) or fail with
    /// [`Exit::Locked`], naming the holder.
    pub fn take_upgrade_lock(&mut self) -> Result<()> {
        let got: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&UPGRADE_LOCK_KEY])
            .context("taking the upgrade advisory lock")?
            .get(0);
        if got {
            return Ok(());
        }
        let who = self
            .upgrade_lock_holder()?
            .unwrap_or_else(|| "another session".into());
        Err(fail(
            Exit::Locked,
            format!(
                "another hydra-upgrade is already working on this database: {who}. \
                 Wait for it to end (`hydra-upgrade status` shows progress), or stop it; \
                 its committed work is kept."
            ),
        ))
    }
}

/// Does a table or index of this name exist (on the search path)?
pub fn relation_exists(c: &mut impl postgres::GenericClient, name: &str) -> Result<bool> {
    Ok(c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .with_context(|| format!("looking up {name}"))?
        .get(0))
}

/// A readable text for a postgres error: the server's message and SQLSTATE when there is
/// one, else the client-side cause.
pub fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

/// The SQLSTATE of the first PostgreSQL error in an error chain.
pub fn sqlstate(err: &anyhow::Error) -> Option<SqlState> {
    err.chain()
        .find_map(|e| e.downcast_ref::<postgres::Error>())
        .and_then(|e| e.code().cloned())
}

/// `SET LOCAL lock_timeout` to `wait`, for the transaction it runs in: how long one of our
/// statements may queue for a lock (and Hydra's requests queue behind it).
pub fn local_lock_timeout(wait: Duration) -> String {
    format!("SET LOCAL lock_timeout = {}", wait.as_millis())
}

/// Lock timeout, deadlock, serialization failure: the batch did nothing and can simply
/// be tried again.
pub fn is_transient(err: &anyhow::Error) -> bool {
    matches!(
        sqlstate(err),
        Some(ref s) if *s == SqlState::LOCK_NOT_AVAILABLE
            || *s == SqlState::T_R_DEADLOCK_DETECTED
            || *s == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// The shorter of two PostgreSQL timeouts, where 0 means none (so 0 only when both are).
pub fn shorter_timeout(a: Duration, b: Duration) -> Duration {
    match (a.is_zero(), b.is_zero()) {
        (true, _) => b,
        (_, true) => a,
        _ => a.min(b),
    }
}

/// statement_timeout fired: the batch was too large for the server's current speed.
pub fn is_statement_timeout(err: &anyhow::Error) -> bool {
    sqlstate(err).is_some_and(|s| s == SqlState::QUERY_CANCELED)
}

/// Capped exponential backoff with full jitter: attempt 0 waits up to `base`, each later
/// attempt doubles the cap, never above `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let cap = base.saturating_mul(1u32 << attempt.min(16)).min(max);
    let ms = cap.as_millis().max(1) as u64;
    Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_grows() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for attempt in 0..40 {
            let d = backoff(attempt, base, max);
            assert!(d <= max, "{attempt}: {d:?}");
            let cap = base.saturating_mul(1u32 << attempt.min(16)).min(max);
            assert!(d >= cap / 2, "{attempt}: {d:?} < half of {cap:?}");
        }
    }

    #[test]
    fn servers_before_10_are_refused_with_their_own_exit_code() {
        let err = check_server_version(90_624).unwrap_err();
        assert_eq!(crate::exit::exit_of(&err), Exit::UnsupportedServer);
        assert!(err.to_string().contains("PostgreSQL 9.6"), "{err}");
        for ok in [100_000, 110_022, 150_004, 180_000] {
            assert!(check_server_version(ok).is_ok(), "{ok}");
        }
    }
}
