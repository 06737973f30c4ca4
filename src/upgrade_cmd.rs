//! `hydra-upgrade upgrade`: resolve the phase systems, preflight, show the plan, ask,
//! then run the flow of [`crate::upgrade`] on the NixOS host (or the simulated one).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::cli::{Global, UpgradeArgs};
use crate::config::Config;
use crate::db::Db;
use crate::dsn::Dsn;
use crate::exec::which;
use crate::exit::{Exit, fail};
use crate::host::commands::{self as c, Target};
use crate::host::nixos::{DetachedBackfill, NixosHost, Settings};
use crate::host::simulated::SimulatedHost;
use crate::host::state::{self, StateFile};
use crate::host::{Host, Phase};
use crate::interrupt::Interrupt;
use crate::progress::Out;
use crate::status::{self, Stage};
use crate::upgrade::{self, Options};

/// Where the two phase systems come from, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemsSource {
    Flags,
    Flake(String),
    ConfigFile,
    None,
}

pub fn systems_source(args: &UpgradeArgs, config: &Config) -> SystemsSource {
    if args.migration_system.is_some() || args.final_system.is_some() {
        SystemsSource::Flags
    } else if let Some(f) = &args.flake {
        SystemsSource::Flake(f.clone())
    } else if config.migration_system.is_some() || config.final_system.is_some() {
        SystemsSource::ConfigFile
    } else {
        SystemsSource::None
    }
}

/// Build both systems of a flake (and copy them to the target host).
fn build_flake(flake: &str, target: &Target, out: &Out) -> Result<[PathBuf; 2]> {
    let attrs = c::flake_attrs(flake).ok_or_else(|| {
        fail(
            Exit::Config,
            format!(
                "--flake {flake}: name the NixOS configuration, as in `--flake .#hydra` \
                 (nixosConfigurations.hydra)"
            ),
        )
    })?;
    let cmd = c::nix_build(&attrs);
    out.say(&format!("building both phase systems\n$ {}", cmd.display()));
    let built = cmd.run().map_err(|e| {
        fail(
            Exit::Config,
            format!(
                "building the phase systems of {flake} failed: {e:#}\nThe flake's NixOS \
                 configuration must expose config.system.build.hydraUpgrade.migration and \
                 .final (this flake's NixOS module does; see docs/upgrade.md)."
            ),
        )
    })?;
    let paths: Vec<PathBuf> = built
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
    let [m, f] = <[PathBuf; 2]>::try_from(paths).map_err(|p| {
        fail(
            Exit::Config,
            format!("`nix build` printed {} paths instead of 2", p.len()),
        )
    })?;
    if let Target::Ssh(dest) = target {
        let cmd = c::nix_copy(dest, &[&m, &f]);
        out.say(&format!("$ {}", cmd.display()));
        cmd.run().map_err(|e| {
            fail(
                Exit::HostFailed,
                format!("copying the phase systems to {dest} failed: {e:#}"),
            )
        })?;
    }
    Ok([m, f])
}

fn resolve_systems(
    args: &UpgradeArgs,
    config: &Config,
    target: &Target,
    out: &Out,
) -> Result<[Option<PathBuf>; 2]> {
    Ok(match systems_source(args, config) {
        SystemsSource::Flags => [args.migration_system.clone(), args.final_system.clone()],
        SystemsSource::Flake(_) if args.dry_run => [None, None],
        SystemsSource::Flake(f) => build_flake(&f, target, out)?.map(Some),
        SystemsSource::ConfigFile => [config.migration_system.clone(), config.final_system.clone()],
        SystemsSource::None => [None, None],
    })
}

/// The `hydra-upgrade backfill` invocation the detached unit runs: the same knobs, the
/// DSN through the environment file only.
fn backfill_argv(args: &UpgradeArgs, global: &Global) -> Result<Vec<String>> {
    let exe = std::env::current_exe().map_err(|e| {
        fail(
            Exit::Environment,
            format!("cannot find our own binary: {e}"),
        )
    })?;
    let b = &args.backfill;
    let mut v = vec![
        exe.display().to_string(),
        "--config".into(),
        global.config_path().display().to_string(),
        "backfill".into(),
    ];
    let mut opt = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            v.push(format!("--{name}"));
            v.push(value);
        }
    };
    opt(
        "strategy",
        b.strategy.map(|s| {
            serde_json::to_value(s)
                .ok()
                .and_then(|j| j.as_str().map(str::to_owned))
                .unwrap_or_default()
        }),
    );
    opt("target-batch-ms", b.target_batch_ms.map(|x| x.to_string()));
    opt("pause-ms", b.pause_ms.map(|x| x.to_string()));
    opt("batch-size", b.batch_size.map(|x| x.to_string()));
    opt("max-batch-size", Some(b.max_batch_size.to_string()));
    opt("lock-timeout-ms", Some(b.lock_timeout_ms.to_string()));
    opt(
        "statement-timeout-ms",
        Some(b.statement_timeout_ms.to_string()),
    );
    opt("max-retries", Some(b.max_retries.to_string()));
    opt("horizon-age-secs", Some(b.horizon_age_secs.to_string()));
    opt("horizon-wait-ms", Some(b.horizon_wait_ms.to_string()));
    opt("pin-cpu", b.pin_cpu.map(|p| p.to_string()));
    opt(
        "max-replication-lag-mb",
        b.replication.max_replication_lag_mb.map(|x| x.to_string()),
    );
    opt(
        "replication-stall-secs",
        Some(b.replication.replication_stall_secs.to_string()),
    );
    Ok(v)
}

/// The DSN text exactly as given (flag, HYDRA_DBI, config file), for the backfill unit.
fn dsn_text(global: &Global, config: &Config) -> Option<String> {
    global
        .db
        .clone()
        .or_else(|| std::env::var("HYDRA_DBI").ok().filter(|v| !v.is_empty()))
        .or_else(|| config.db.clone())
}

fn build_nixos_host(
    args: &UpgradeArgs,
    global: &Global,
    config: &Config,
    dsn: &Dsn,
    out: &Out,
    interrupt: &Interrupt,
) -> Result<NixosHost> {
    let target = Target::new(args.target_host.as_deref());
    let mut systems = resolve_systems(args, config, &target, out)?;
    let state_dir = args
        .state_dir
        .clone()
        .or_else(|| config.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(state::DEFAULT_DIR));
    let mut state = if args.dry_run {
        StateFile::read_only(&state_dir)?
    } else {
        StateFile::open(&state_dir)?
    };
    let database = dsn.describe();
    // The database is its name, host and port; the role a run connects as is not part of
    // it (a DSN spelled without `user=` by another admin names the same database).
    let without_user = |d: &str| {
        d.split_whitespace()
            .filter(|t| !t.starts_with("user="))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !state.state.database.is_empty()
        && without_user(&state.state.database) != without_user(&database)
    {
        if let Some(to) = &state.state.switching_to {
            // Starting afresh would forget that switch and where to roll it back to.
            return Err(fail(
                Exit::Config,
                format!(
                    "the state file in {} belongs to another database ({}), and a switch to \
                     the {to} system is under way there: name that database as before (--db, \
                     HYDRA_DBI or the config file) to finish it, or, if it is done with, move \
                     the state file away and run again",
                    state_dir.display(),
                    state.state.database
                ),
            ));
        }
        out.warn(&format!(
            "the state file in {} belongs to another database ({}); starting a fresh one",
            state_dir.display(),
            state.state.database
        ));
        state.state = state::State {
            started_at: state::now(),
            ..state::State::default()
        };
    }
    state.state.database = database;
    // A re-run without flags uses the systems an earlier run resolved.
    if systems == [None, None] && systems_source(args, config) == SystemsSource::None {
        let s = &state.state;
        if s.migration_system.is_some() && s.final_system.is_some() {
            out.say("using the phase systems remembered in the state file");
            systems = [s.migration_system.clone(), s.final_system.clone()];
        }
    }
    let hydra_url = args
        .hydra_url
        .clone()
        .or_else(|| config.hydra_url.clone())
        .unwrap_or_else(|| format!("http://{}:3000", target.hostname().unwrap_or("localhost")));
    let detach = target == Target::Local
        && !args.foreground_backfill
        && std::env::var_os("INVOCATION_ID").is_none()
        && which("systemd-run").is_some();
    let detached_backfill = if detach {
        let mut env = Vec::new();
        if let Some(dsn) = dsn_text(global, config) {
            env.push(("HYDRA_DBI".to_owned(), dsn));
        }
        for name in [
            "PGPASSWORD",
            "PGPASSFILE",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGDATABASE",
        ] {
            if let Ok(v) = std::env::var(name) {
                env.push((name.to_owned(), v));
            }
        }
        // A system unit has neither $HOME nor $USER: hand it the role this process
        // resolved (a DSN's own user= still wins) and the pgpass file it would read.
        if std::env::var_os("PGUSER").is_none()
            && let Some(user) = dsn.config.get_user()
        {
            env.push(("PGUSER".to_owned(), user.to_owned()));
        }
        if std::env::var_os("PGPASSFILE").is_none()
            && let Some(file) = crate::dsn::pgpass_path().filter(|f| f.is_file())
        {
            env.push(("PGPASSFILE".to_owned(), file.display().to_string()));
        }
        Some(DetachedBackfill {
            argv: backfill_argv(args, global)?,
            env,
        })
    } else {
        None
    };
    let settings = Settings {
        target,
        mode: args.mode,
        systems,
        hooks: [
            args.migration_switch_command.clone(),
            args.final_switch_command.clone(),
        ],
        hydra_url,
        init_timeout: Duration::from_secs(args.hydra_init_timeout_secs),
        health_timeout: Duration::from_secs(args.health_timeout_secs),
        poll: Duration::from_millis(args.poll_ms.max(10)),
        detached_backfill,
    };
    Ok(NixosHost::new(settings, state, interrupt.clone()))
}

/// Ask on the terminal; without one, only `--yes` goes on.
fn confirm(yes: bool) -> Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(fail(
            Exit::Declined,
            "no terminal to ask for confirmation on: read the plan above (or \
             `hydra-upgrade upgrade --dry-run`), then run again with --yes",
        ));
    }
    crate::progress::write_err(format_args!("Proceed with this upgrade? [y/N] "));
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(fail(
            Exit::Declined,
            "declined; nothing was changed. Run again when ready.",
        ))
    }
}

fn print_report(r: &upgrade::Report, out: &Out, json: bool, host: &str) -> Result<()> {
    if json {
        crate::print_json(r)?;
        return Ok(());
    }
    for (step, secs) in &r.steps {
        crate::outln!("{step:<40} {secs:>8.1}s");
    }
    let version = r
        .final_status
        .as_ref()
        .map(|s| s.schema_version)
        .unwrap_or(0);
    if r.switches.is_empty() {
        // Hydra's health is checked after each switch; with none, it was not looked at.
        crate::outln!(
            "upgrade complete: schema {version}; this run switched nothing on {host} (Hydra's \
             health not checked: `systemctl status 'hydra-*'`)"
        );
    } else {
        crate::outln!("upgrade complete: schema {version}, Hydra is healthy on {host}");
    }
    if r.longest_final_block_seconds > 0.0 {
        crate::outln!(
            "longest write-blocking lock of the final phase: {:.3}s",
            r.longest_final_block_seconds
        );
    }
    out.say(
        "next: pin the final Hydra in your configuration (services.hydra.package = \
         pkgs.hydra-unstable, or keep hydraUpgrade's final phase selected) so that the next \
         nixos-rebuild does not go back to hydra-migration or an older Hydra: an older \
         evaluator cannot write the NOT NULL jobset_id columns.",
    );
    Ok(())
}

/// What resolving the systems runs before anything else (`--flake`): build, and copy.
fn build_commands(args: &UpgradeArgs, config: &Config) -> Vec<String> {
    let SystemsSource::Flake(flake) = systems_source(args, config) else {
        return Vec::new();
    };
    let Some(attrs) = c::flake_attrs(&flake) else {
        return Vec::new();
    };
    let mut v = vec![c::nix_build(&attrs).display()];
    if let Target::Ssh(dest) = Target::new(args.target_host.as_deref()) {
        let placeholders = [
            PathBuf::from("<migration system>"),
            PathBuf::from("<final system>"),
        ];
        v.push(c::nix_copy(&dest, &[&placeholders[0], &placeholders[1]]).display());
    }
    v
}

fn dry_run(
    host: &dyn Host,
    s: &status::Status,
    stock_final: bool,
    build: Vec<String>,
    json: bool,
) -> Result<Exit> {
    let plan = upgrade::plan(s, stock_final, &host.describe(), host.pending_switch());
    let mut steps = Vec::new();
    if !build.is_empty() {
        steps.push(("build".to_owned(), build));
    }
    steps.push(("preflight".to_owned(), host.dry_run_commands("preflight")));
    for p in &plan {
        let mut cmds = host.dry_run_commands(p.step);
        if p.step == "switch-final" {
            cmds.insert(
                0,
                "(database) verify: refuse the switch unless no row is left".into(),
            );
        }
        if matches!(p.step, "verify" | "finalize") {
            cmds.push(format!("(database) {}", p.description));
        }
        steps.push((p.step.to_owned(), cmds));
    }
    if json {
        let doc: Vec<_> = steps
            .iter()
            .map(|(s, c)| serde_json::json!({"step": s, "commands": c}))
            .collect();
        crate::print_json(&serde_json::json!({"dry_run": true, "status": s, "steps": doc}))?;
    } else {
        crate::outln!(
            "dry run: schema {} ({:?}); `hydra-upgrade upgrade` would run, in order:",
            s.schema_version,
            s.stage
        );
        for (step, cmds) in &steps {
            crate::outln!("== {step}");
            for cmd in cmds {
                crate::outln!("   {cmd}");
            }
        }
        crate::outln!("nothing was changed.");
    }
    Ok(Exit::Ok)
}

pub fn run(
    args: &UpgradeArgs,
    global: &Global,
    config: &Config,
    opts: &Options,
    out: &Out,
) -> Result<Exit> {
    let interrupt = Interrupt::install()?;
    let dsn = config.dsn(global.db.as_deref())?;
    let mut db = Db::connect(&dsn)?;
    let mut host: Box<dyn Host> = if args.simulate_host {
        Box::new(SimulatedHost::new(dsn.clone()))
    } else {
        Box::new(build_nixos_host(
            args, global, config, &dsn, out, &interrupt,
        )?)
    };
    // A NULL count that would wait for a lock (a stock hydra-init's, of an activation an
    // earlier run left running) is left out of the plan instead of holding up every word.
    let s = status::detect_with(&mut db, false, Some(status::STATUS_LOCK_WAIT))?;
    if args.dry_run {
        let build = build_commands(args, config);
        return dry_run(host.as_ref(), &s, opts.stock_final, build, global.json);
    }
    // A finished upgrade: schema 65 and the host on the final system, or moved on from it
    // to a system of the admin's own. No preflight then: the phase systems it checks may
    // be garbage-collected by now, and nothing will be switched.
    let nothing_to_do = s.stage == Stage::Final
        && host.pending_switch().is_none()
        && (host.is_on(Phase::Final)? || host.moved_on_from_final()?);
    if !nothing_to_do {
        out.event(
            "step_start",
            "==> preflight",
            serde_json::json!({"step": "preflight"}),
        );
        host.record_step("preflight", None)?;
        host.preflight(out)?;
        out.event(
            "step_done",
            "<== preflight: done",
            serde_json::json!({"step": "preflight"}),
        );
        if !global.json {
            crate::errln!(
                "database {}: schema {} ({:?}). The upgrade will:",
                s.database,
                s.schema_version,
                s.stage
            );
            for (i, st) in upgrade::plan(
                &s,
                opts.stock_final,
                &host.describe(),
                host.pending_switch(),
            )
            .iter()
            .enumerate()
            {
                crate::errln!("{:>2}. {:<17} {}", i + 1, st.step, st.description);
            }
        }
        confirm(args.yes)?;
    }
    let r = upgrade::run(&mut db, host.as_mut(), opts, out, &interrupt)?;
    print_report(&r, out, global.json, &host.describe())?;
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(argv: &[&str]) -> UpgradeArgs {
        let mut full = vec!["hydra-upgrade", "upgrade"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Upgrade(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn flags_then_flake_then_config_file_name_the_systems() {
        let config = Config {
            migration_system: Some("/nix/store/c-m".into()),
            final_system: Some("/nix/store/c-f".into()),
            ..Config::default()
        };
        let flags = args(&["--migration-system", "/m", "--final-system", "/f"]);
        assert_eq!(systems_source(&flags, &config), SystemsSource::Flags);
        let flake = args(&["--flake", ".#hydra"]);
        assert_eq!(
            systems_source(&flake, &config),
            SystemsSource::Flake(".#hydra".into())
        );
        assert_eq!(
            systems_source(&args(&[]), &config),
            SystemsSource::ConfigFile
        );
        assert_eq!(
            systems_source(&args(&[]), &Config::default()),
            SystemsSource::None
        );
        // one without the other, or both ways at once, is a usage error
        let bad = |argv: &[&str]| {
            let mut full = vec!["hydra-upgrade", "upgrade"];
            full.extend_from_slice(argv);
            Cli::try_parse_from(full).is_err()
        };
        assert!(bad(&["--migration-system", "/m"]));
        assert!(bad(&[
            "--flake",
            ".#h",
            "--migration-system",
            "/m",
            "--final-system",
            "/f"
        ]));
    }

    #[test]
    fn the_backfill_unit_gets_the_knobs_but_never_the_dsn() {
        let a = args(&[
            "--strategy",
            "per-page",
            "--pause-ms",
            "5",
            "--pin-cpu",
            "off",
            "--max-replication-lag-mb",
            "64",
            "--db",
            "postgresql://u:secret@h/db",
        ]);
        let global = Global {
            db: Some("postgresql://u:secret@h/db".into()),
            json: false,
            config: Some("/etc/hydra-upgrade/config.json".into()),
        };
        let argv = backfill_argv(&a, &global).unwrap().join(" ");
        assert!(
            argv.contains(" --config /etc/hydra-upgrade/config.json backfill "),
            "{argv}"
        );
        assert!(argv.contains("--strategy per-page"), "{argv}");
        assert!(argv.contains("--pause-ms 5"), "{argv}");
        assert!(argv.contains("--pin-cpu off"), "{argv}");
        assert!(argv.contains("--max-replication-lag-mb 64"), "{argv}");
        assert!(!argv.contains("secret"), "{argv}");
    }
}
