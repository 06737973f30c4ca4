//! hydra-upgrade: carry a self-hosted Hydra through its two-phase `jobset_id` schema
//! upgrade, online and resumable. `main.rs` only parses the command line; everything else
//! is here so that tests and benchmarks call the same code.

pub mod backfill;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod dsn;
pub mod exec;
pub mod exit;
pub mod finalize;
pub mod host;
pub mod hydra_schema;
pub mod interrupt;
pub mod pg_cluster;
pub mod progress;
pub mod rehearse;
pub mod status;
pub mod synth;
pub mod upgrade;
pub mod upgrade_cmd;
pub mod verify;
pub mod wal_prepare;
pub mod workload;

use anyhow::Result;
use serde::Serialize;

use cli::{Cli, Command};
use config::Config;
use db::Db;
use exit::{Exit, fail};
use interrupt::Interrupt;
use progress::Out;

/// A `--json` document, on one line: after JSON-lines events (backfill, upgrade) the
/// final report is one more line, so line-by-line readers get it whole.
pub(crate) fn print_json(value: &impl Serialize) -> Result<()> {
    crate::outln!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// `backfill --report-file`: the report for `upgrade`, which ran the backfill in a unit
/// of its own. The backfill has ended well by then: a failure to write is only warned
/// about (`upgrade` then reports the backfill without its figures).
fn write_report_file(path: Option<&std::path::Path>, report: &backfill::Report, out: &Out) {
    let Some(path) = path else {
        return;
    };
    let written = serde_json::to_string(report)
        .map_err(anyhow::Error::from)
        .and_then(|text| Ok(std::fs::write(path, text)?));
    if let Err(e) = written {
        out.warn(&format!(
            "cannot write the report to {}: {e:#}",
            path.display()
        ));
    }
}

fn flow_options(b: &cli::BackfillArgs, config: &Config, stock_final: bool) -> upgrade::Options {
    let backfill = backfill::Options::from_args(b, config);
    upgrade::Options {
        finalize: finalize::Options {
            replication: backfill.replication,
            ..finalize::Options::defaults()
        },
        backfill,
        stock_final,
        max_rounds: 3,
    }
}

pub fn run(cli: Cli) -> Result<Exit> {
    let out = Out::new(cli.global.json);
    let config = Config::load(&cli.global.config_path())?;
    let json = cli.global.json;
    let connect = || -> Result<Db> { Db::connect(&config.dsn(cli.global.db.as_deref())?) };
    match &cli.command {
        Command::Status { exact } => {
            let mut db = connect()?;
            let s = status::detect_with(&mut db, *exact, Some(status::STATUS_LOCK_WAIT))?;
            if json {
                print_json(&s)?
            } else {
                progress::print_text(&status::render(&s))
            }
            Ok(Exit::Ok)
        }
        Command::Plan => {
            let mut db = connect()?;
            let s = status::detect(&mut db, false)?;
            let steps = upgrade::plan(&s, false, "the host", None);
            let wal = upgrade::wal_outlook(&mut db, &s)?;
            let hot = upgrade::hot_outlook(&mut db, &s)?;
            // While a backfill or finalize is still to come: both wait for standbys, at
            // the limit a run would use (the config file's, else the default).
            let replication = if s.stage == status::Stage::Final {
                None
            } else {
                let settings = backfill::replication::Settings::from_args(
                    &cli::BackfillArgs::defaults().replication,
                    &config,
                );
                Some(backfill::replication::Outlook::read(
                    &mut db,
                    settings.max_lag_mb,
                )?)
            };
            if json {
                print_json(&serde_json::json!({
                    "status": s,
                    "plan": steps,
                    "wal_segments": wal.map(|o| o.data()),
                    "hot_blockers": hot,
                    "replication": replication,
                }))?;
            } else {
                crate::outln!(
                    "schema {} ({:?}); `hydra-upgrade upgrade` would:",
                    s.schema_version,
                    s.stage
                );
                for (i, st) in steps.iter().enumerate() {
                    crate::outln!("{:>2}. {:<17} {}", i + 1, st.step, st.description);
                }
                if let Some(o) = wal {
                    crate::outln!("backfill's WAL: {}", o.summary());
                    for w in o.warnings() {
                        crate::outln!("warning: {w}");
                    }
                }
                for b in &hot {
                    crate::outln!(
                        "warning: HOT updates of Builds are defeated right now: {b}; unless \
                         that ends first, `--strategy auto` walks Builds by keyset (slower, \
                         and Builds grows)"
                    );
                }
                for line in replication.iter().flat_map(|r| r.lines()) {
                    crate::outln!("{line}");
                }
                if s.wal_prepared {
                    crate::outln!("{}", wal_prepare::REMINDER);
                }
            }
            Ok(Exit::Ok)
        }
        Command::Backfill(cmd) => {
            let args = &cmd.knobs;
            let interrupt = Interrupt::install()?;
            let mut db = connect()?;
            let s = status::detect_stage(&mut db)?;
            // At the final stage the columns may be gone (Jobs is dropped in schema 67).
            let done = s.stage == status::Stage::Final || {
                backfill::require_columns(&s)?;
                !s.jobs_jobset_id.nullable && !s.builds_jobset_id.nullable
            };
            if done {
                backfill::autoanalyze::release_left_over(&mut db, &out)?;
                out.say("nothing to backfill: both jobset_id columns are NOT NULL already");
                // The report a script reads last: no table walked.
                let report = backfill::Report {
                    tables: Vec::new(),
                    seconds: 0.0,
                };
                write_report_file(cmd.report_file.as_deref(), &report, &out);
                if json {
                    print_json(&report)?;
                }
                return Ok(Exit::Ok);
            }
            let opts = backfill::Options::from_args(args, &config);
            let report = backfill::run(&mut db, &opts, &out, &interrupt)?;
            write_report_file(cmd.report_file.as_deref(), &report, &out);
            if json {
                print_json(&report)?;
            } else {
                progress::print_text(&report.render());
            }
            Ok(Exit::Ok)
        }
        Command::Verify => {
            let mut db = connect()?;
            let s = status::detect_stage(&mut db)?;
            // At the final stage Jobs may be gone (schema 67 drops it); verify checks
            // what is there.
            if s.stage != status::Stage::Final {
                backfill::require_columns(&s)?;
            }
            let v = verify::run(&mut db)?;
            if json {
                print_json(&v)?
            } else {
                progress::print_text(&v.render())
            }
            Ok(if v.clean { Exit::Ok } else { Exit::RowsLeft })
        }
        Command::Finalize(args) => {
            let mut db = connect()?;
            let s = status::detect_stage(&mut db)?;
            match s.stage {
                status::Stage::Final => {
                    backfill::autoanalyze::release_left_over(&mut db, &out)?;
                    out.say("nothing to do: the schema is at 65 or later");
                    if json {
                        print_json(&finalize::Report::default())?;
                    }
                    return Ok(Exit::Ok);
                }
                status::Stage::BeforeMigration => {
                    return Err(fail(
                        Exit::WrongPhase,
                        format!(
                            "finalize needs the migration package's schema (61) and a complete \
                             backfill; this database is at schema {}. {}",
                            s.schema_version, s.next_step
                        ),
                    ));
                }
                status::Stage::Migration => {}
            }
            // First the lock: while a backfill runs, "another hydra-upgrade is working"
            // (exit 8, naming it) says more than the rows it has not reached yet.
            db.take_upgrade_lock_waiting(&Interrupt::default(), &out)?;
            let v = verify::run(&mut db)?;
            if !v.clean {
                return Err(fail(
                    Exit::RowsLeft,
                    format!("finalize is refused while rows are left: {}", v.summary()),
                ));
            }
            let opts = finalize::Options::from_args(args, &config);
            // No handler of ours: Ctrl-C ends the process at once, during a wait for a
            // standby as during an index build (which the server carries on or ends by
            // itself: the re-run drops an invalid leftover and builds it again, or renames
            // a finished one).
            let r = finalize::run(&mut db, &opts, &out, &Interrupt::default())?;
            if json {
                print_json(&r)?
            } else {
                progress::print_text(&r.render());
            }
            Ok(Exit::Ok)
        }
        Command::Rehearse(args) => {
            if cli.global.db.is_some() {
                out.warn(
                    "rehearse never touches the database --db names; it rehearses on synthetic \
                     data, or on a copy of that database with --from-db",
                );
            }
            let interrupt = Interrupt::install()?;
            let opts = flow_options(&args.backfill, &config, args.stock_final);
            let r = rehearse::run(args, &opts, &out, &interrupt)?;
            if json {
                print_json(&r)?
            } else {
                progress::print_text(&r.render())
            }
            Ok(Exit::Ok)
        }
        Command::Upgrade(args) => {
            let opts = flow_options(&args.backfill, &config, args.stock_final);
            upgrade_cmd::run(args, &cli.global, &config, &opts, &out)
        }
        Command::Wal { action } => {
            let mut db = connect()?;
            match action {
                cli::WalAction::Prepare { pause_ms } => {
                    let interrupt = Interrupt::install()?;
                    let opts = wal_prepare::Options {
                        pause: std::time::Duration::from_millis(*pause_ms),
                    };
                    let r = wal_prepare::prepare(&mut db, &opts, &out, &interrupt)?;
                    if json {
                        print_json(&r)?;
                    } else {
                        crate::outln!(
                            "wal prepare: {} MB of WAL segments ready for about {} MB of WAL, in {:.1}s; \
                             after the upgrade: `hydra-upgrade wal reset`",
                            r.ready_after_bytes >> 20,
                            r.expected_bytes >> 20,
                            r.seconds
                        );
                    }
                }
                cli::WalAction::Reset => {
                    let r = wal_prepare::reset(&mut db, &out)?;
                    if json {
                        print_json(&r)?;
                    }
                }
            }
            Ok(Exit::Ok)
        }
    }
}
