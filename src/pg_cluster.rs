//! A throwaway PostgreSQL cluster: `initdb` in a temporary directory, listening on a Unix
//! socket only, stopped and removed on drop. Used by `rehearse`, the tests and the
//! benchmark. As root it runs the server as an unprivileged user (`postgres`, else
//! `nobody`), since `initdb` refuses to run as root.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::db::Db;
use crate::dsn::Dsn;
use crate::exec::{Cmd, shell_words, which};
use crate::exit::{Exit, fail};

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH, \
    through `pg_config --bindir`, or under /usr/lib/postgresql/*/bin. Install them: \
    `apt-get install postgresql` (Debian/Ubuntu), `nix shell nixpkgs#postgresql`, or use \
    this flake's dev shell (`nix develop`).";

/// Where the server binaries are: PATH, then `pg_config --bindir`, then the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf> {
    if let Some(initdb) = which("initdb") {
        // Follow symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb) to
        // the directory that also holds pg_ctl, pg_dump and psql.
        let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        return Ok(real.parent().expect("a file has a parent").to_owned());
    }
    if which("pg_config").is_some()
        && let Ok(out) = Cmd::new("pg_config").arg("--bindir").run()
    {
        let dir = PathBuf::from(out.stdout.trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| fail(Exit::Environment, INSTALL_HINT))
}

/// The unprivileged account to run the server as, when we are root.
fn server_account() -> Result<Option<(String, u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == wanted {
                return Ok(Some((wanted.to_owned(), f[2].parse()?, f[3].parse()?)));
            }
        }
    }
    Err(fail(
        Exit::Environment,
        "running as root, and neither a `postgres` nor a `nobody` account exists to run \
         initdb as (initdb refuses root). Create one (`useradd -r postgres`) or run as a \
         normal user.",
    ))
}

/// Where the throwaway cluster of a server run as another account (`name`) goes: the
/// temporary directory if that account can enter it and every directory above it, else
/// `/tmp` (a root-only `TMPDIR`, as a `nix develop` shell may set, would make initdb
/// fail with "Permission denied").
fn base_dir_for(name: &str, uid: u32, gid: u32) -> Result<PathBuf> {
    let tmp = std::env::temp_dir();
    for candidate in [tmp.clone(), PathBuf::from("/tmp")] {
        if enterable_by(&candidate, uid, gid) {
            return Ok(candidate);
        }
    }
    Err(fail(
        Exit::Environment,
        format!(
            "the server of the throwaway cluster runs as `{name}` (initdb refuses root), and \
             that account can enter neither {} nor /tmp. Set TMPDIR to a directory it can \
             enter, e.g. `TMPDIR=/var/tmp`.",
            tmp.display()
        ),
    ))
}

/// A temporary directory under `parent` for the cluster's `pg_wal`, which the server
/// account (when we are root) must be able to enter.
fn wal_dir_in(parent: &Path, account: &Option<(String, u32, u32)>) -> Result<TempDir> {
    if let Some((name, uid, gid)) = account
        && !enterable_by(parent, *uid, *gid)
    {
        return Err(fail(
            Exit::Environment,
            format!(
                "the WAL directory's parent {} cannot be entered by `{name}`, the account \
                 the throwaway server runs as; give that account search permission on it \
                 and every directory above it (chmod o+x)",
                parent.display()
            ),
        ));
    }
    tempfile::Builder::new()
        .prefix("hydra-upgrade-pg-wal.")
        .tempdir_in(parent)
        .with_context(|| {
            format!(
                "creating a temporary directory for the cluster's WAL in {}",
                parent.display()
            )
        })
}

/// Can `uid`/`gid` traverse `dir` and every directory above it (search permission)?
fn enterable_by(dir: &Path, uid: u32, gid: u32) -> bool {
    dir.ancestors().all(|d| match std::fs::metadata(d) {
        Ok(m) if m.is_dir() => {
            let bit = if m.uid() == uid {
                0o100
            } else if m.gid() == gid {
                0o010
            } else {
                0o001
            };
            m.mode() & bit != 0
        }
        _ => false,
    })
}

pub struct PgCluster {
    dir: TempDir,
    /// With [`PgCluster::start_with_wal_in`], the directory holding `pg_wal` (initdb's
    /// `--waldir`; `data/pg_wal` is then a symlink to it).
    wal: Option<TempDir>,
    bin: PathBuf,
    /// The unprivileged account the server runs as (name, uid, gid), when we are root.
    account: Option<(String, u32, u32)>,
    stopped: bool,
}

pub const SUPERUSER: &str = "postgres";

impl PgCluster {
    /// initdb and start a cluster. `settings` are extra `name=value` server settings,
    /// written into its `postgresql.conf` as an admin's are: `ALTER SYSTEM` overrides
    /// them, as on a production server.
    pub fn start(settings: &[&str]) -> Result<PgCluster> {
        PgCluster::start_with(&[], settings)
    }

    /// [`PgCluster::start`] with extra `initdb` arguments, for what only initdb sets
    /// (e.g. `--wal-segsize`).
    pub fn start_with(initdb_args: &[&str], settings: &[&str]) -> Result<PgCluster> {
        PgCluster::start_full(initdb_args, None, settings)
    }

    /// [`PgCluster::start`] with the WAL (`pg_wal`) in a temporary directory under
    /// `parent` (initdb's `--waldir`), e.g. on a disk of its own; removed with the cluster.
    pub fn start_with_wal_in(parent: &Path, settings: &[&str]) -> Result<PgCluster> {
        PgCluster::start_full(&[], Some(parent), settings)
    }

    fn start_full(
        initdb_args: &[&str],
        wal_parent: Option<&Path>,
        settings: &[&str],
    ) -> Result<PgCluster> {
        let bin = find_bindir()?;
        let account = server_account()?;
        let wal = match wal_parent {
            Some(parent) => Some(wal_dir_in(parent, &account)?),
            None => None,
        };
        if let (Some(w), Some((_, uid, gid))) = (&wal, &account) {
            std::os::unix::fs::chown(w.path(), Some(*uid), Some(*gid))
                .context("handing the temporary directory to the server account")?;
        }
        let waldir_arg = wal
            .as_ref()
            .map(|w| format!("--waldir={}", w.path().join("pg_wal").display()));
        let mut cluster = PgCluster::unstarted(bin, account, wal)?;
        cluster
            .tool("initdb")
            .args(["-D"])
            .arg(cluster.data())
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .args(initdb_args)
            .args(&waldir_arg)
            .run()
            .context("initdb of the throwaway cluster")?;
        let mut conf = String::from("\n# hydra-upgrade's throwaway cluster\n");
        for s in settings {
            let (name, value) = s
                .split_once('=')
                .with_context(|| format!("server setting {s:?} is not name=value"))?;
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        cluster.append_to_data_file("postgresql.conf", &conf)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A streaming standby of this cluster (`pg_basebackup`: its settings are this
    /// cluster's), in a temporary directory and on a socket of its own, connecting as
    /// `application_name` and, with `slot`, through a physical replication slot of that
    /// name (created here). It follows this cluster until it is stopped.
    pub fn start_standby(&self, application_name: &str, slot: Option<&str>) -> Result<PgCluster> {
        let mut primary = self.connect("postgres")?;
        let server_version = primary.server_version()?;
        if let Some(slot) = slot {
            primary
                .client()
                .execute("SELECT pg_create_physical_replication_slot($1)", &[&slot])
                .with_context(|| format!("creating the standby's slot {slot}"))?;
        }
        let mut standby = PgCluster::unstarted(self.bin.clone(), self.account.clone(), None)?;
        standby
            .tool("pg_basebackup")
            .arg("-D")
            .arg(standby.data())
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", "5432", "-U", SUPERUSER])
            .args(["-X", "stream", "-c", "fast", "--no-sync"])
            .run()
            .context("pg_basebackup of the standby")?;
        // Written here rather than by `pg_basebackup -R`, whose connection string (from a
        // newer pg_basebackup than the server, as .ci/older-postgres runs it) may carry
        // options an older server's libpq refuses.
        let mut conf = format!(
            "primary_conninfo = 'host={} port=5432 user={SUPERUSER} application_name={application_name}'\n",
            self.socket_dir().display()
        );
        if let Some(slot) = slot {
            conf.push_str(&format!("primary_slot_name = '{slot}'\n"));
        }
        let (file, text, signal) = if server_version >= 120_000 {
            ("postgresql.auto.conf", conf, Some("standby.signal"))
        } else {
            (
                "recovery.conf",
                format!("standby_mode = 'on'\n{conf}"),
                None,
            )
        };
        standby.append_to_data_file(file, &text)?;
        if let Some(signal) = signal {
            standby.append_to_data_file(signal, "")?;
        }
        standby.start_server()?;
        Ok(standby)
    }

    /// A cluster whose data directory is not made yet, in a new temporary directory that
    /// the server account owns.
    fn unstarted(
        bin: PathBuf,
        account: Option<(String, u32, u32)>,
        wal: Option<TempDir>,
    ) -> Result<PgCluster> {
        let base = match &account {
            Some((name, uid, gid)) => base_dir_for(name, *uid, *gid)?,
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("hydra-upgrade-pg.")
            .tempdir_in(&base)
            .with_context(|| {
                format!(
                    "creating a temporary directory for PostgreSQL in {}",
                    base.display()
                )
            })?;
        if let Some((_, uid, gid)) = &account {
            std::os::unix::fs::chown(dir.path(), Some(*uid), Some(*gid))
                .context("handing the temporary directory to the server account")?;
        }
        Ok(PgCluster {
            dir,
            wal,
            bin,
            account,
            stopped: true,
        })
    }

    /// Append `text` to the file `name` in the data directory (made if missing) and hand
    /// it to the server account, so the server reads it whatever our umask.
    fn append_to_data_file(&self, name: &str, text: &str) -> Result<()> {
        let path = self.data().join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        if let Some((_, uid, gid)) = &self.account {
            std::os::unix::fs::chown(&path, Some(*uid), Some(*gid))
                .with_context(|| format!("handing {} to the server account", path.display()))?;
        }
        Ok(())
    }

    /// Start the server on the data directory, listening on the socket directory only.
    fn start_server(&mut self) -> Result<()> {
        let opts = format!(
            "-c listen_addresses= -c unix_socket_directories={} -c max_connections=60",
            self.socket_dir().display()
        );
        let log = self.dir.path().join("server.log");
        let started = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .run();
        if let Err(e) = started {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(e.context(format!(
                "starting the throwaway PostgreSQL; server log:\n{log_text}"
            )));
        }
        self.stopped = false;
        Ok(())
    }

    /// The cluster's data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of the database whose `pg_database.oid` is `oid` (its files, for a
    /// benchmark that acts on their place in the page cache).
    pub fn database_dir(&self, oid: u32) -> PathBuf {
        self.data().join("base").join(oid.to_string())
    }

    /// The cluster's WAL (for `pg_waldump`).
    pub fn wal_dir(&self) -> PathBuf {
        self.data().join("pg_wal")
    }

    /// The cluster's data directory and its WAL directory, symlinks followed: where the
    /// two live, for a benchmark's record of the machine.
    pub fn storage(&self) -> (PathBuf, PathBuf) {
        let real = |p: PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
        (real(self.data()), real(self.wal_dir()))
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server tool, run as the server account when we are root.
    pub fn tool(&self, name: &str) -> Cmd {
        let cmd = Cmd::new(self.bin.join(name));
        match self.account.as_ref().map(|a| &a.0) {
            Some(user) => cmd.wrapped(&["runuser", "-u", user, "--"]),
            None => cmd,
        }
    }

    /// A client tool (psql, pg_dump, pg_restore), run as ourselves.
    pub fn client_tool(&self, name: &str) -> Cmd {
        Cmd::new(self.bin.join(name))
    }

    /// Keyword DSN for a database of this cluster.
    pub fn dsn_string(&self, dbname: &str, user: &str) -> String {
        format!(
            "host={} port=5432 user={user} dbname={dbname}",
            self.socket_dir().display()
        )
    }

    pub fn dsn(&self, dbname: &str) -> Dsn {
        Dsn::parse(&self.dsn_string(dbname, SUPERUSER)).expect("a valid keyword DSN")
    }

    pub fn connect(&self, dbname: &str) -> Result<Db> {
        Db::connect(&self.dsn(dbname))
    }

    /// `CREATE DATABASE name [TEMPLATE t]`.
    pub fn create_database(&self, name: &str, template: Option<&str>) -> Result<()> {
        let mut admin = self.connect("postgres")?;
        let sql = match template {
            Some(t) => format!("CREATE DATABASE {name} TEMPLATE {t}"),
            None => format!("CREATE DATABASE {name}"),
        };
        admin
            .client()
            .batch_execute(&sql)
            .with_context(|| format!("creating database {name}"))
    }

    /// Put lines in front of pg_hba.conf (e.g. password auth for one role) and reload.
    pub fn prepend_hba(&self, lines: &str) -> Result<()> {
        let path = self.data().join("pg_hba.conf");
        let old = std::fs::read_to_string(&path)?;
        std::fs::write(&path, format!("{lines}\n{old}"))?;
        self.tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("reload")
            .run()?;
        Ok(())
    }

    /// Keep this cluster for the rest of the process and stop it (and remove its
    /// directory) as soon as process `pid` has exited, even if that process is killed.
    /// For test binaries and benchmarks that share one cluster across many tests.
    pub fn share_until_exit(mut self, pid: u32) -> Result<&'static PgCluster> {
        let stop =
            self.tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "stop"]);
        let dirs: Vec<String> = std::iter::once(&self.dir)
            .chain(&self.wal)
            .map(|d| d.path().display().to_string())
            .collect();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {} >/dev/null 2>&1; rm -rf {}",
            shell_words(&stop.argv()),
            shell_words(&dirs)
        );
        Cmd::new("sh").args(["-c", &script]).spawn_detached()?;
        self.stopped = true; // the watcher stops it; a leaked static is never dropped anyway
        Ok(Box::leak(Box::new(self)))
    }

    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .run()
            .map(|_| ())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            crate::errln!("warning: stopping the throwaway PostgreSQL failed: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_private_directory_is_not_enterable_by_another_account() {
        // An account that owns nothing here (not the one running the test).
        let me = nix::unistd::getuid().as_raw();
        let other = if me == 65_000 { 65_001 } else { 65_000 };
        let parent = std::env::temp_dir();
        let dir = tempfile::Builder::new().tempdir_in(&parent).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!enterable_by(dir.path(), other, other));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // Enterable once searchable by others, if everything above it is (a build
        // sandbox's private TMPDIR is not).
        assert_eq!(
            enterable_by(dir.path(), other, other),
            enterable_by(&parent, other, other)
        );
        assert!(!enterable_by(&dir.path().join("missing"), other, other));
    }
}
