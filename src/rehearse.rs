//! `rehearse`: the whole upgrade on a throwaway PostgreSQL, on synthetic data or on a
//! copy of production, to learn how long each phase takes before touching production.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::cli::RehearseArgs;
use crate::db::Db;
use crate::dsn::Dsn;
use crate::exit::{Exit, exit_of, fail};
use crate::host::simulated::SimulatedHost;
use crate::interrupt::Interrupt;
use crate::pg_cluster::PgCluster;
use crate::progress::Out;
use crate::status;
use crate::synth;
use crate::upgrade;

#[derive(Debug, Serialize)]
pub struct Rehearsal {
    pub source: String,
    pub load_seconds: f64,
    pub builds: i64,
    pub jobs: i64,
    pub builds_mb_before: f64,
    pub builds_mb_after: f64,
    pub upgrade: upgrade::Report,
}

fn builds_mb(db: &mut crate::db::Db) -> Result<f64> {
    let bytes: i64 = db
        .client()
        .query_one("SELECT pg_total_relation_size('builds')", &[])?
        .get(0);
    Ok(bytes as f64 / 1_048_576.0)
}

/// Restore a pg_dump file: pg_restore for archive formats, psql for plain SQL.
fn restore(cluster: &PgCluster, file: &Path) -> Result<()> {
    let dsn = cluster.dsn_string("hydra", crate::pg_cluster::SUPERUSER);
    let mut head = [0u8; 5];
    let is_archive = file.is_dir()
        || std::fs::File::open(file)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .map(|_| &head == b"PGDMP")
            .unwrap_or(false)
        || file.extension().is_some_and(|e| e == "tar");
    let cmd = if is_archive {
        cluster
            .client_tool("pg_restore")
            .args([
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "-d",
                &dsn,
            ])
            .arg(file)
    } else {
        cluster
            .client_tool("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &dsn, "-f"])
            .arg(file)
    };
    cmd.run()
        .with_context(|| format!("restoring {} into the throwaway cluster", file.display()))?;
    Ok(())
}

/// Dump a live database (read-only for it) to a file; the password goes in PGPASSWORD.
fn dump(cluster: &PgCluster, source: &Dsn, file: &Path) -> Result<()> {
    let c = &source.config;
    let (host, port) = (source.host(), source.port().to_string());
    let mut cmd = cluster
        .client_tool("pg_dump")
        .args([
            "-Fc",
            "--no-owner",
            "--no-privileges",
            "-h",
            &host,
            "-p",
            &port,
        ])
        .args(["-U", c.get_user().unwrap_or(""), "-f"])
        .arg(file)
        .arg(c.get_dbname().unwrap_or(""));
    if let Some(pw) = c.get_password() {
        cmd = cmd.env("PGPASSWORD", String::from_utf8_lossy(pw).into_owned());
    }
    cmd.run()
        .with_context(|| format!("dumping {}", source.describe()))?;
    Ok(())
}

/// Rehearse the whole upgrade on a throwaway cluster (removed when this returns).
pub fn run(
    args: &RehearseArgs,
    opts: &upgrade::Options,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<Rehearsal> {
    check_source(args)?;
    rehearse(args, opts, out, interrupt).map_err(|e| {
        if exit_of(&e) == Exit::Interrupted {
            // The engine's own advice (re-run to resume) does not hold here: the copy it
            // would resume on is gone.
            fail(
                Exit::Interrupted,
                "rehearsal interrupted; its throwaway copy was removed and production was not \
                 touched. Run `hydra-upgrade rehearse` again to start over.",
            )
        } else {
            e
        }
    })
}

/// Before a throwaway cluster is started and anything is copied: the dump file exists,
/// the live database answers and is a Hydra database (with the exit code of each case).
fn check_source(args: &RehearseArgs) -> Result<()> {
    if let Some(file) = &args.from_dump
        && !file.exists()
    {
        return Err(fail(
            Exit::Config,
            format!(
                "--from-dump {}: no such file or directory. Give a pg_dump of Hydra's \
                 database (custom, directory, tar or plain SQL format).",
                file.display()
            ),
        ));
    }
    if let Some(from) = &args.from_db {
        let source = Dsn::parse(from)?;
        match Db::connect(&source) {
            Ok(mut db) => {
                status::detect_stage(&mut db).map_err(|e| not_hydra_names("--from-db", e))?;
            }
            // A server too old for the upgrade itself can still be copied into the
            // throwaway cluster and rehearsed on (pg_dump reads servers back to 9.2).
            Err(e) if exit_of(&e) == Exit::UnsupportedServer => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A "not a Hydra database" error that names where the database came from (`detect`'s
/// own message points at `--db`).
fn not_hydra_names(origin: &str, e: anyhow::Error) -> anyhow::Error {
    if exit_of(&e) == Exit::NotHydra {
        fail(
            Exit::NotHydra,
            format!(
                "{origin} is not a Hydra database (no SchemaVersion, Jobsets or Builds table): \
                 it must name the database Hydra itself uses, or a dump of it."
            ),
        )
    } else {
        e
    }
}

fn rehearse(
    args: &RehearseArgs,
    opts: &upgrade::Options,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<Rehearsal> {
    out.say("rehearse: starting a throwaway PostgreSQL");
    let cluster = PgCluster::start(&["max_wal_size=2GB", "shared_buffers=256MB"])?;
    cluster.create_database("hydra", None)?;
    let dsn = cluster.dsn("hydra");
    let mut db = cluster.connect("hydra")?;
    let load = Instant::now();
    let source = if let Some(file) = &args.from_dump {
        out.say(&format!("rehearse: restoring {}", file.display()));
        restore(&cluster, file)?;
        format!("dump {}", file.display())
    } else if let Some(from) = &args.from_db {
        let source = Dsn::parse(from)?;
        out.say(&format!(
            "rehearse: copying {} with pg_dump (read-only for it)",
            source.describe()
        ));
        let tmp = tempfile::NamedTempFile::new()?;
        dump(&cluster, &source, tmp.path())?;
        restore(&cluster, tmp.path())?;
        format!("copy of {}", source.describe())
    } else {
        let spec = synth::Spec {
            projects: args.projects,
            jobsets: args.jobsets,
            jobs: args.jobs,
            builds: args.builds,
            seed: args.seed,
        };
        out.say(&format!(
            "rehearse: generating a synthetic Hydra at schema 57: {} projects, {} jobsets, {} jobs, {} builds",
            spec.projects, spec.jobsets, spec.jobs, spec.builds
        ));
        synth::generate(&mut db, &spec)?;
        "synthetic".to_owned()
    };
    let load_seconds = load.elapsed().as_secs_f64();
    let start = status::detect(&mut db, false).map_err(|e| {
        if let Some(file) = &args.from_dump {
            not_hydra_names(&format!("the dump {}", file.display()), e)
        } else {
            not_hydra_names("--from-db", e)
        }
    })?;
    out.say(&status::render(&start));
    let counts = db.client().query_one(
        "SELECT (SELECT count(*) FROM builds), (SELECT count(*) FROM jobs)",
        &[],
    )?;
    let builds_mb_before = builds_mb(&mut db)?;
    let mut host = SimulatedHost::new(dsn);
    let upgrade = upgrade::run(&mut db, &mut host, opts, out, interrupt)?;
    Ok(Rehearsal {
        source,
        load_seconds,
        builds: counts.get(0),
        jobs: counts.get(1),
        builds_mb_before,
        builds_mb_after: builds_mb(&mut db)?,
        upgrade,
    })
}

impl Rehearsal {
    pub fn render(&self) -> String {
        let mut s = format!(
            "rehearsal on {} data: {} builds, {} jobs (loaded in {:.1}s)\n\n{:<40} {:>10}\n",
            self.source, self.builds, self.jobs, self.load_seconds, "step", "seconds"
        );
        for (step, secs) in &self.upgrade.steps {
            s.push_str(&format!("{step:<40} {secs:>10.2}\n"));
        }
        for b in &self.upgrade.backfills {
            for t in &b.tables {
                let rate = t.rows_updated as f64 / t.seconds.max(1e-6);
                s.push_str(&format!(
                    "backfill {:<7} {:>9} rows in {:>7.2}s = {:>9.0} rows/s ({}, {} transactions, {} retries, {} orphans)\n",
                    t.table.name(), t.rows_updated, t.seconds, rate, t.strategy, t.transactions, t.retries, t.rows_skipped
                ));
                s.push_str(&format!(
                    "         {:<7} HOT updates {}, size {:.1} MB -> {:.1} MB ({:+.1} %)\n",
                    "",
                    t.hot_share
                        .map(|h| format!("{:.1} %", 100.0 * h))
                        .unwrap_or_else(|| "-".into()),
                    t.bytes_before as f64 / 1_048_576.0,
                    t.bytes_after as f64 / 1_048_576.0,
                    100.0 * (t.bytes_after as f64 / t.bytes_before.max(1) as f64 - 1.0)
                ));
            }
        }
        s.push_str(&format!(
            "Builds size (table + indexes) before the upgrade and at its end (with the two new indexes): {:.1} MB, {:.1} MB ({:+.0} %)\n",
            self.builds_mb_before,
            self.builds_mb_after,
            100.0 * (self.builds_mb_after / self.builds_mb_before.max(1e-9) - 1.0)
        ));
        if let Some(f) = &self.upgrade.finalize {
            for st in &f.blocking_steps {
                s.push_str(&format!(
                    "final phase, write-blocking step: {:<45} {:.3}s\n",
                    st.step, st.seconds
                ));
            }
            for st in &f.online_steps {
                s.push_str(&format!(
                    "final phase, online step:         {:<45} {:.3}s\n",
                    st.step, st.seconds
                ));
            }
        }
        s.push_str(&format!(
            "longest lock blocking Hydra's writes in the final phase: {:.3}s\n",
            self.upgrade.longest_final_block_seconds
        ));
        if let Some(st) = &self.upgrade.final_status {
            s.push_str(&format!(
                "final schema version: {}; {}\n",
                st.schema_version, st.next_step
            ));
        }
        s
    }
}
