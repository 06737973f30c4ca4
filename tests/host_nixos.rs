//! `hydra-upgrade upgrade` on a NixOS host, through the real binary and a real
//! PostgreSQL, with the fake host tools of tests/fake-host (see its README).

mod common;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use hydra_upgrade::hydra_schema;
use hydra_upgrade::pg_cluster::find_bindir;

const FAKE_BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake-host");

/// A fake hydra-server: answers every request with 200.
fn hydra_url() -> String {
    static PORT: OnceLock<u16> = OnceLock::new();
    let port = *PORT.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut req = Vec::new();
                let mut buf = [0u8; 2048];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        });
        port
    });
    format!("http://127.0.0.1:{port}/")
}

struct Fake {
    _dir: tempfile::TempDir,
    root: PathBuf,
    db: TestDb,
}

impl Fake {
    /// A host running the original Hydra, its database at `version`.
    fn new(version: i32) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let db = hydra_at(version);
        for d in [
            "state",
            "state/units",
            "state/journal",
            "systems",
            "upgrade-state",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let f = Fake {
            _dir: dir,
            root,
            db,
        };
        for (name, target) in [
            ("original", None),
            ("migration", Some(61)),
            ("final", Some(65)),
        ] {
            f.add_system(name, target);
        }
        let orig = f.system("original");
        std::os::unix::fs::symlink(&orig, f.state("current-system")).unwrap();
        std::os::unix::fs::symlink(&orig, f.state("profile")).unwrap();
        for u in [
            "hydra-init",
            "hydra-server",
            "hydra-queue-runner",
            "hydra-evaluator",
        ] {
            std::fs::write(
                f.state(&format!("units/{u}.service")),
                "LoadState=loaded\nActiveState=active\nResult=success\nExecMainStatus=0\n",
            )
            .unwrap();
        }
        f
    }

    fn system(&self, name: &str) -> PathBuf {
        self.root.join("systems").join(name)
    }

    /// A fake NixOS system `name` whose hydra-init brings the schema to `target` (none:
    /// a Hydra that knows no upgrade of ours).
    fn add_system(&self, name: &str, target: Option<i32>) {
        let sys = self.system(name);
        std::fs::create_dir_all(sys.join("bin")).unwrap();
        std::fs::create_dir_all(sys.join("sql")).unwrap();
        std::os::unix::fs::symlink(
            Path::new(FAKE_BIN).join("switch-to-configuration"),
            sys.join("bin/switch-to-configuration"),
        )
        .unwrap();
        if let Some(t) = target {
            std::fs::write(sys.join("target-version"), t.to_string()).unwrap();
            for n in 58..=t {
                std::fs::write(
                    sys.join(format!("sql/upgrade-{n}.sql")),
                    hydra_schema::step_sql(n).unwrap(),
                )
                .unwrap();
            }
        }
    }

    /// Point the running system and the system profile at `name`, as a `nixos-rebuild
    /// switch` of the admin's own would.
    fn rebuild_into(&self, name: &str) {
        for link in ["current-system", "profile"] {
            std::fs::remove_file(self.state(link)).unwrap();
            std::os::unix::fs::symlink(self.system(name), self.state(link)).unwrap();
        }
    }

    fn state(&self, rel: &str) -> PathBuf {
        self.root.join("state").join(rel)
    }

    fn upgrade_state(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.root.join("upgrade-state/state.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Inject a failure into a fake system (`fail-switch`, `fail-init`, `unhealthy`).
    fn inject(&self, system: &str, flag: &str) {
        std::fs::write(self.system(system).join(flag), "").unwrap();
    }

    fn current(&self) -> String {
        link_name(&self.state("current-system"))
    }

    fn profile(&self) -> String {
        link_name(&self.state("profile"))
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.state("calls.log")).unwrap_or_default()
    }

    fn systems_args(&self) -> Vec<String> {
        vec![
            "--migration-system".into(),
            self.system("migration").display().to_string(),
            "--final-system".into(),
            self.system("final").display().to_string(),
        ]
    }

    /// [`Fake::expr_uncaptured`], its output captured.
    fn expr(&self, args: &[String], env: &[(&str, String)]) -> duct::Expression {
        self.expr_uncaptured(args, env)
            .stdout_capture()
            .stderr_capture()
    }

    /// `hydra-upgrade --db ... upgrade <args>` with the fake tools first on PATH, its
    /// output not redirected.
    fn expr_uncaptured(&self, args: &[String], env: &[(&str, String)]) -> duct::Expression {
        self.expr_uncaptured_on(&self.db.dsn, args, env)
    }

    /// [`Fake::expr`] with another DSN (another database, or another role).
    fn expr_on(&self, dsn: &str, args: &[String], env: &[(&str, String)]) -> duct::Expression {
        self.expr_uncaptured_on(dsn, args, env)
            .stdout_capture()
            .stderr_capture()
    }

    /// [`Fake::expr_uncaptured`] with another DSN.
    fn expr_uncaptured_on(
        &self,
        dsn: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> duct::Expression {
        let mut full: Vec<String> = vec!["--db".into(), dsn.to_owned(), "upgrade".into()];
        full.extend(args.iter().cloned());
        let path = format!("{FAKE_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        let psql = find_bindir().unwrap().join("psql");
        let mut e = duct::cmd(BIN, full)
            .env("PATH", path)
            .env("FAKE_STATE", self.root.join("state"))
            .env("FAKE_PSQL", psql)
            .env("FAKE_DSN", &self.db.dsn)
            .env("FAKE_FLAKE_MIGRATION", self.system("migration"))
            .env("FAKE_FLAKE_FINAL", self.system("final"))
            .env_remove("INVOCATION_ID")
            .env_remove("HYDRA_DBI")
            .env_remove("PGPASSWORD")
            .env_remove("HYDRA_UPGRADE_CONFIG")
            .stdin_null()
            .unchecked();
        for (k, v) in env {
            e = e.env(k, v);
        }
        e
    }

    /// The common flags: state dir, fake hydra-server, fast polling, short health timeout.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--state-dir",
            &self.root.join("upgrade-state").display().to_string(),
            "--hydra-url",
            &hydra_url(),
            "--poll-ms",
            "20",
            "--health-timeout-secs",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn run_raw(&self, args: &[String], env: &[(&str, String)]) -> Run {
        let out = self.expr(args, env).run().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Upgrade with the systems named by flags and `--yes`, plus `extra`.
    fn run(&self, extra: &[&str]) -> Run {
        let mut a = self.args(extra);
        a.extend(self.systems_args());
        a.push("--yes".into());
        self.run_raw(&a, &[])
    }

    fn spawn(&self, extra: &[&str]) -> duct::Handle {
        let mut a = self.args(extra);
        a.extend(self.systems_args());
        a.push("--yes".into());
        self.expr(&a, &[]).start().unwrap()
    }

    fn assert_final(&self) {
        assert_eq!(self.db.version(), 65);
        assert_eq!(self.db.wrong_or_null(), 0);
        assert_eq!(self.current(), "final");
        assert_eq!(
            self.db.query_string(
                "SELECT string_agg(is_nullable, ',' ORDER BY table_name) FROM information_schema.columns WHERE column_name = 'jobset_id'"
            ),
            "NO,NO"
        );
    }
}

fn link_name(p: &Path) -> String {
    std::fs::read_link(p)
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Whether a process runs (a zombie does not count).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// The live processes whose command line mentions `needle`.
fn processes_naming(needle: &Path) -> Vec<String> {
    let needle = needle.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid = e.ok()?.file_name().into_string().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (text.contains(&needle) && alive(&pid)).then_some(pid)
        })
        .collect()
}

fn kill(pid: &str, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([signal, pid.trim()])
        .status();
}

/// The index in the call log of the first line containing `needle` (after `from`).
fn pos(calls: &str, needle: &str) -> usize {
    calls
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not called:\n{calls}"))
}

/// Ctrl-C on a terminal: it reaches the whole foreground group, us and the client of
/// the systemd-run `unit` we wait for.
fn ctrl_c(f: &Fake, h: &duct::Handle, unit: &str) {
    let client =
        std::fs::read_to_string(f.state(&format!("units/{unit}.service.client-pid"))).unwrap();
    for pid in h.pids() {
        kill(&pid.to_string(), "-INT");
    }
    kill(&client, "-INT");
}

/// Start `upgrade` (with `extra`) with the activation of `system` paused, and wait until
/// it has got there (lift the pause by removing `pause-stc-<system>`).
fn spawn_paused_at(f: &Fake, extra: &[&str], system: &str) -> duct::Handle {
    std::fs::write(f.state(&format!("pause-stc-{system}")), "").unwrap();
    let h = f.spawn(extra);
    wait_for(&format!("the activation of the {system} system"), || {
        f.state(&format!("paused-stc-{system}")).exists()
    });
    h
}

/// Start a re-run (with `extra`) while the activation of `system` is paused, wait until
/// it has looked at the switch unit `unit`, do `meanwhile`, then lift the pause: the
/// re-run's exit code and stderr. (The fake logs a `show` once its answer is decided; a
/// fixed sleep instead lost the race on a loaded machine: the activation had ended.)
fn rerun_past_a_paused_activation(
    f: &Fake,
    extra: &[&str],
    unit: &str,
    system: &str,
    meanwhile: impl FnOnce(),
) -> (Option<i32>, String) {
    let look = format!("systemctl show -p ActiveState {unit}.service");
    let asked = || f.calls().matches(look.as_str()).count();
    let before = asked();
    let rerun = f.spawn(extra);
    wait_for(&format!("the re-run to look at {unit}"), || {
        asked() > before
    });
    meanwhile();
    std::fs::remove_file(f.state(&format!("pause-stc-{system}"))).unwrap();
    let out = rerun.wait().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Backfill knobs slow enough that the run is still going when a test interrupts it.
const SLOW_BACKFILL: [&str; 8] = [
    "--strategy",
    "keyset",
    "--batch-size",
    "300",
    "--max-batch-size",
    "300",
    "--pause-ms",
    "40",
];

#[test]
fn full_upgrade_from_58_to_65_with_explicit_systems() {
    let f = Fake::new(58);
    let digest = f.db.digest_without_jobset_id();
    let r = f.run(&[]);
    r.expect_code(0);
    f.assert_final();
    assert_eq!(f.profile(), "final", "switch mode sets the system profile");
    assert_eq!(f.db.digest_without_jobset_id(), digest);
    assert_contains(&r.stdout, "upgrade complete: schema 65");
    assert_contains(&r.stderr, "pin the final Hydra");
    // nixos-rebuild's order: profile, then activation under systemd-run; backfill in its unit
    let c = f.calls();
    let m = f.system("migration").display().to_string();
    let a = pos(
        &c,
        &format!("nix-env -p /nix/var/nix/profiles/system --set {m}"),
    );
    let b = pos(
        &c,
        "systemd-run --wait --pipe --collect --service-type=exec --quiet --no-ask-password --unit=hydra-upgrade-switch-migration",
    );
    let d = pos(
        &c,
        "systemd-run --wait --collect --service-type=exec --quiet --no-ask-password --unit=hydra-upgrade-backfill -p",
    );
    let e = pos(&c, "switch-to-configuration switch final");
    assert!(a < b && b < d && d < e, "{c}");
    // The backfill unit's output goes to its journal, shown to us while we wait for it;
    // the activation's stdout (to our stderr) does not mix with ours.
    let journal =
        std::fs::read_to_string(f.state("journal/hydra-upgrade-backfill.service")).unwrap();
    assert_contains(&journal, "next: `hydra-upgrade verify`");
    assert_contains(&r.stderr, "next: `hydra-upgrade verify`");
    assert_contains(&r.stderr, "setting up /etc...");
    assert!(!r.stdout.contains("setting up /etc"), "{}", r.stdout);
    assert!(
        c.contains("systemctl show -p ActiveState,Result,ExecMainStatus hydra-init.service"),
        "{c}"
    );
    assert!(
        !c.contains(&f.db.dsn),
        "the DSN must not appear on any command line:\n{c}"
    );
    let s = f.upgrade_state();
    assert_eq!(s["step"], "done");
    assert_eq!(s["migration_system"], m);
    assert!(s["switching_to"].is_null());
    assert!(
        s["timings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["step"] == "backfill")
    );
    assert!(!f.root.join("upgrade-state/backfill.env").exists());
    // a second run has nothing to do but reset what a backfill killed outright leaves
    f.db.exec("ALTER TABLE builds SET (autovacuum_analyze_threshold = 2000000000)");
    let r = f.run(&[]);
    r.expect_code(0);
    assert!(!r.stderr.contains("==> switch"), "{}", r.stderr);
    assert_eq!(reloptions(&f.db, "builds"), "");
}

#[test]
fn systems_from_the_config_file_and_test_mode() {
    let f = Fake::new(58);
    let config = f.root.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "db": f.db.dsn,
            "migration_system": f.system("migration"),
            "final_system": f.system("final"),
            "state_dir": f.root.join("upgrade-state"),
            "hydra_url": hydra_url(),
        })
        .to_string(),
    )
    .unwrap();
    let args: Vec<String> = [
        "--config",
        config.to_str().unwrap(),
        "--yes",
        "--mode",
        "test",
        "--poll-ms",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    f.run_raw(&args, &[]).expect_code(0);
    f.assert_final();
    assert_eq!(
        f.profile(),
        "original",
        "test mode leaves the profile alone"
    );
    assert!(!f.calls().contains("nix-env"));
    assert!(f.calls().contains("switch-to-configuration test final"));
    assert_eq!(
        f.upgrade_state()["final_system"],
        f.system("final").display().to_string()
    );
}

#[test]
fn systems_from_a_flake_are_built_with_nix() {
    let f = Fake::new(58);
    let args = f.args(&["--flake", "/etc/nixos#hydra", "--yes"]);
    f.run_raw(&args, &[]).expect_code(0);
    f.assert_final();
    let c = f.calls();
    assert!(
        c.contains("nix --extra-experimental-features nix-command flakes build --no-link --print-out-paths /etc/nixos#nixosConfigurations.\"hydra\".config.system.build.hydraUpgrade.migration /etc/nixos#nixosConfigurations.\"hydra\".config.system.build.hydraUpgrade.final"),
        "{c}"
    );
    assert!(pos(&c, "build --no-link") < pos(&c, "nix-env"));
}

#[test]
fn a_flake_without_the_attributes_is_a_config_error() {
    let f = Fake::new(58);
    let args = f.args(&["--flake", "/etc/nixos", "--yes"]);
    let r = f.run_raw(&args, &[]);
    r.expect_code(3);
    assert_contains(&r.stderr, "--flake .#hydra");
    assert_eq!(f.db.version(), 58);
}

#[test]
fn switch_hooks_replace_the_activation() {
    let f = Fake::new(58);
    let hook = "\"$HYDRA_UPGRADE_SYSTEM/bin/switch-to-configuration\" switch && echo \"hook $HYDRA_UPGRADE_PHASE\" >>\"$FAKE_STATE/calls.log\"";
    let r = f.run(&[
        "--migration-switch-command",
        hook,
        "--final-switch-command",
        hook,
    ]);
    r.expect_code(0);
    f.assert_final();
    let c = f.calls();
    assert!(pos(&c, "hook migration") < pos(&c, "hook final"), "{c}");
    assert!(
        !c.contains("nix-env"),
        "hooks replace the profile and activation:\n{c}"
    );
}

#[test]
fn a_failed_switch_rolls_back_and_exits_10() {
    let f = Fake::new(58);
    f.inject("migration", "fail-switch");
    let r = f.run(&[]);
    r.expect_code(10);
    assert_contains(&r.stderr, "Rolled back: the host runs");
    assert_contains(&r.stderr, "switch-to-configuration failed");
    assert_eq!(f.current(), "original");
    assert_eq!(f.profile(), "original");
    assert_eq!(f.db.version(), 58);
    assert!(f.upgrade_state()["switching_to"].is_null());
    // fixed, a re-run without naming the systems again uses those the state file keeps
    std::fs::remove_file(f.system("migration").join("fail-switch")).unwrap();
    let r = f.run_raw(&f.args(&["--yes"]), &[]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "using the phase systems remembered in the state file",
    );
    f.assert_final();
}

#[test]
fn a_failed_hydra_init_rolls_back_with_its_journal() {
    let f = Fake::new(58);
    f.inject("migration", "fail-init");
    let r = f.run(&[]);
    r.expect_code(10);
    assert_contains(&r.stderr, "last journal lines of hydra-init");
    assert_contains(
        &r.stderr,
        "schema upgrade failed: injected failure in migration",
    );
    assert_eq!(f.current(), "original");
    assert!(
        f.calls()
            .contains("journalctl -u hydra-init -n 20 --no-pager")
    );
}

#[test]
fn an_unhealthy_hydra_after_the_final_switch_rolls_back_to_the_migration_system() {
    let f = Fake::new(58);
    f.inject("final", "unhealthy");
    let r = f.run(&[]);
    r.expect_code(10);
    assert_contains(&r.stderr, "hydra-server.service is failed");
    assert_contains(&r.stderr, "injected crash in final");
    assert_eq!(f.current(), "migration");
    assert_eq!(f.profile(), "migration");
    assert_eq!(f.db.version(), 65, "the database keeps what was committed");
    std::fs::remove_file(f.system("final").join("unhealthy")).unwrap();
    f.run(&[]).expect_code(0);
    f.assert_final();
}

/// Ctrl-C while a failed switch is being rolled back reaches the rollback's systemd-run
/// client, not its activation, which goes on in its unit: exit 130 (not 11, "the
/// rollback failed"), and the re-run waits for that unit before it activates anything, so
/// that two activations never overlap.
#[test]
fn ctrl_c_during_a_rollback_exits_130_and_the_rerun_waits_for_the_rollback_unit() {
    let f = Fake::new(58);
    f.inject("migration", "unhealthy");
    let h = spawn_paused_at(&f, &[], "original");
    ctrl_c(&f, &h, "hydra-upgrade-switch-rollback");
    let out = h.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_contains(&stderr, "Interrupted while rolling back to");
    assert_eq!(f.upgrade_state()["switching_to"], "migration");
    // fixed meanwhile; the rollback's activation is still paused when the re-run starts
    std::fs::remove_file(f.system("migration").join("unhealthy")).unwrap();
    let (code, stderr) =
        rerun_past_a_paused_activation(&f, &[], "hydra-upgrade-switch-rollback", "original", || {});
    assert_eq!(code, Some(0), "{stderr}");
    assert_contains(
        &stderr,
        "hydra-upgrade-switch-rollback.service, started by an earlier run, is still running",
    );
    f.assert_final();
}

/// An activation that restarts PostgreSQL closes the tool's session (and its upgrade
/// lock). The tool connects again, takes the upgrade lock again and confirms the switch;
/// before, the closed session failed the confirmation and the switch that had worked was
/// rolled back (exit 10).
#[test]
fn a_switch_that_restarts_postgresql_is_confirmed_on_a_new_session() {
    let f = Fake::new(58);
    f.inject("migration", "restart-db");
    f.inject("final", "restart-db");
    std::fs::write(f.state("log-upgrade-lock"), "").unwrap();
    let r = f.run(&["--foreground-backfill"]);
    r.expect_code(0);
    f.assert_final();
    // The health check right after the migration switch runs on the new session, which
    // holds the upgrade lock again (no other upgrade can start in between).
    let calls = f.calls();
    let after_switch = &calls[pos(&calls, "switch-to-configuration switch migration")..];
    let health = after_switch
        .find("show -p LoadState,ActiveState hydra-server.service")
        .expect("a health check after the migration switch");
    let lock_line = after_switch[health..]
        .lines()
        .nth(1)
        .expect("the lock logged after the health check's call");
    assert_eq!(lock_line, "upgrade-lock 1", "{after_switch}");
    assert_eq!(
        r.stderr
            .matches("the switch closed our database session")
            .count(),
        2,
        "{}",
        r.stderr
    );
    assert!(
        !f.calls()
            .contains("switch-to-configuration switch original")
    );
}

/// The migration switch's hydra-init adds the columns (schema 61), then Hydra fails its
/// health check and the host is rolled back to the original system, which keeps running
/// on schema 61 and writes rows without jobset_id. The re-run switches to the migration
/// system again before it backfills; before, it backfilled and finalized under the
/// original system and only then switched to the final one.
#[test]
fn after_a_rolled_back_migration_switch_a_rerun_switches_again_before_the_backfill() {
    let f = Fake::new(58);
    f.inject("migration", "unhealthy");
    let r = f.run(&[]);
    r.expect_code(10);
    assert_eq!(f.current(), "original");
    assert_eq!(
        f.db.version(),
        61,
        "the database keeps what hydra-init committed"
    );
    std::fs::remove_file(f.system("migration").join("unhealthy")).unwrap();
    let before = f.calls().len();
    let r = f.run(&[]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "yet the host runs neither the migration nor the final system",
    );
    let calls = f.calls()[before..].to_owned();
    let migration = pos(&calls, "switch-to-configuration switch migration");
    let backfill = pos(&calls, "--unit=hydra-upgrade-backfill ");
    let last = pos(&calls, "switch-to-configuration switch final");
    assert!(migration < backfill && backfill < last, "{calls}");
    f.assert_final();
}

#[test]
fn a_failed_rollback_exits_11() {
    let f = Fake::new(58);
    f.inject("migration", "fail-init");
    f.inject("original", "fail-switch");
    let r = f.run(&[]);
    r.expect_code(11);
    assert_contains(&r.stderr, "Rolling back to");
    assert_contains(
        &r.stderr,
        "roll back by hand: `nix-env -p /nix/var/nix/profiles/system --set",
    );
}

#[test]
fn null_rows_right_before_the_final_switch_refuse_it() {
    let f = Fake::new(58);
    let psql = find_bindir().unwrap().join("psql");
    // An old evaluator writes a row without jobset_id at the moment the tool remembers the
    // running system before the final switch (the first read after the backfill ran).
    let hook = format!(
        "{} '{}' -Xq -c \"INSERT INTO builds (finished, timestamp, project, jobset, job, drvpath, system) SELECT 0, 0, project, jobset, job, '/nix/store/late.drv', 'x86_64-linux' FROM builds LIMIT 1\"",
        psql.display(),
        f.db.dsn
    );
    let mut a = f.args(&["--stock-final", "--yes"]);
    a.extend(f.systems_args());
    let r = f.run_raw(
        &a,
        &[
            (
                "FAKE_READLINK_HOOK_WHEN",
                f.state("journal/hydra-upgrade-backfill.service")
                    .display()
                    .to_string(),
            ),
            ("FAKE_READLINK_HOOK", hook),
        ],
    );
    r.expect_code(7);
    assert_contains(&r.stderr, "the final switch is refused");
    assert_contains(&r.stderr, "builds: 1 NULL");
    assert_eq!(f.current(), "migration");
    assert_eq!(f.db.version(), 61);
    assert!(!f.calls().contains("switch-to-configuration switch final"));
    assert!(f.upgrade_state()["switching_to"].is_null());
    // the writer is gone: a re-run backfills the row and finishes with the stock final phase
    let r = f.run(&["--stock-final"]);
    r.expect_code(0);
    f.assert_final();
}

/// Start `upgrade --stock-final`; when, after its backfill, it reads the running system
/// to remember before the final switch, a session takes Builds' ACCESS EXCLUSIVE lock
/// (as a hydra-init would) until [`release_builds`], so the verify before the switch
/// waits.
fn stock_final_run_locking_builds_before_the_final_switch(f: &Fake) -> duct::Handle {
    let psql = find_bindir().unwrap().join("psql");
    let hook = f.root.join("lock-builds.sh");
    std::fs::write(
        &hook,
        format!(
            "{psql} '{dsn}' -Xq -c 'BEGIN; LOCK TABLE builds IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(120)' >/dev/null 2>&1 &\n\
             until [ \"$({psql} '{dsn}' -XtAc \"SELECT count(*) FROM pg_locks WHERE database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND relation = 'builds'::regclass AND mode = 'AccessExclusiveLock' AND granted\")\" = 1 ]; do sleep 0.05; done\n",
            psql = psql.display(),
            dsn = f.db.dsn
        ),
    )
    .unwrap();
    let mut a = f.args(&["--stock-final", "--yes"]);
    a.extend(f.systems_args());
    f.expr(
        &a,
        &[
            (
                "FAKE_READLINK_HOOK_WHEN",
                f.state("journal/hydra-upgrade-backfill.service")
                    .display()
                    .to_string(),
            ),
            ("FAKE_READLINK_HOOK", format!("sh {}", hook.display())),
        ],
    )
    .start()
    .unwrap()
}

/// End the session that [`stock_final_run_locking_builds_before_the_final_switch`] made
/// lock Builds.
fn release_builds(f: &Fake) {
    f.db.connect()
        .client()
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND query LIKE '%pg_sleep(120)%'
                AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap();
}

/// A `--stock-final` run whose verify right before the final switch fails (here: waiting
/// for a lock, cancelled by an admin) leaves no pending switch: the host never left the
/// migration system. So a re-run without `--stock-final` finalizes online, as asked,
/// instead of "finishing" a stock final switch that never began.
#[test]
fn a_failed_verify_before_the_final_switch_leaves_no_switch_to_finish() {
    let f = Fake::new(58);
    let handle = stock_final_run_locking_builds_before_the_final_switch(&f);
    // The verify before the switch waits for the lock: an admin cancels it.
    cancel_lock_waiters(&f.db, "the verify before the final switch");
    let out = handle.wait().unwrap();
    release_builds(&f);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(f.db.version(), 61);
    the_rerun_finalizes_online(&f);
}

/// No switch left pending, the host still on the migration system: a re-run without
/// `--stock-final` finalizes online, as asked, and finishes.
fn the_rerun_finalizes_online(f: &Fake) {
    assert!(
        f.upgrade_state()["switching_to"].is_null(),
        "{}",
        f.upgrade_state()
    );
    assert_eq!(f.current(), "migration");
    let r = f.run(&[]);
    r.expect_code(0);
    assert!(
        !r.stderr.contains("finishing that switch first"),
        "{}",
        r.stderr
    );
    assert_contains(&r.stdout, "finalize online");
    f.assert_final();
}

/// After the upgrade, the admin pins the final package and rebuilds into a system of their
/// own. A later `upgrade` switches nothing: not back to the tool's final system (with the
/// systems named again, or remembered in the state file), nor does it refuse because the
/// phase systems have been garbage-collected since; and it does not claim a health check
/// it did not make.
#[test]
fn a_rerun_after_the_upgrade_leaves_a_host_that_moved_on_alone() {
    let f = Fake::new(58);
    let r = f.run(&[]);
    r.expect_code(0);
    assert_contains(&r.stdout, "Hydra is healthy on");
    f.assert_final();
    f.add_system("pinned", Some(65));
    f.rebuild_into("pinned");
    let calls = f.calls().len();
    let r = f.run(&[]);
    r.expect_code(0);
    assert_contains(&r.stderr, "the host has moved on");
    assert_contains(&r.stdout, "this run switched nothing");
    assert!(!r.stdout.contains("Hydra is healthy"), "{}", r.stdout);
    assert_eq!(
        (f.current(), f.profile()),
        ("pinned".into(), "pinned".into())
    );
    assert!(
        !f.calls()[calls..].contains("switch-to-configuration"),
        "{}",
        &f.calls()[calls..]
    );
    // the phase systems collected, the re-run without flags (systems from the state file)
    std::fs::remove_dir_all(f.system("migration")).unwrap();
    std::fs::remove_dir_all(f.system("final")).unwrap();
    let r = f.run_raw(&f.args(&["--yes"]), &[]);
    r.expect_code(0);
    assert_contains(&r.stdout, "this run switched nothing");
    assert_eq!(
        (f.current(), f.profile()),
        ("pinned".into(), "pinned".into())
    );
    assert_eq!(f.db.version(), 65);
}

/// After the upgrade the host went back, not on: to the system from before the upgrade
/// (a `--mode test` switch undone by a reboot), or to an older generation whose hydra-init
/// the schema guard refuses at schema 65. A re-run switches to the final system again.
#[test]
fn a_rerun_after_the_host_went_back_to_an_older_system_switches_to_the_final_one() {
    let f = Fake::new(58);
    f.run(&[]).expect_code(0);
    f.rebuild_into("original");
    let r = f.run(&[]);
    r.expect_code(0);
    assert!(!r.stderr.contains("moved on"), "{}", r.stderr);
    assert_contains(&r.stdout, "Hydra is healthy on");
    f.assert_final();
    f.add_system("older", None);
    f.rebuild_into("older");
    std::fs::write(
        f.state("units/hydra-init.service"),
        "LoadState=loaded\nActiveState=failed\nResult=exit-code\nExecMainStatus=1\n",
    )
    .unwrap();
    let r = f.run(&[]);
    r.expect_code(0);
    assert!(!r.stderr.contains("moved on"), "{}", r.stderr);
    f.assert_final();
}

/// A `--stock-final` run killed while its verify right before the final switch runs (it
/// waits here for a lock; at tens of millions of builds it simply takes minutes) leaves
/// no switch pending: the re-run without `--stock-final` finalizes online, as asked,
/// instead of finishing a stock final switch whose activation never began.
#[test]
fn killed_during_the_verify_before_the_final_switch_leaves_no_switch_to_finish() {
    let f = Fake::new(58);
    let handle = stock_final_run_locking_builds_before_the_final_switch(&f);
    let mut admin = f.db.connect();
    wait_for(
        "the verify before the final switch to wait for the lock",
        || {
            let waiting: i64 = admin
                .client()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND pid <> pg_backend_pid()",
                    &[],
                )
                .unwrap()
                .get(0);
            waiting > 0
        },
    );
    handle.kill().unwrap();
    // The killed run's session holds the upgrade lock until its verify ends, once Builds
    // is let go; the re-run waits for it.
    release_builds(&f);
    the_rerun_finalizes_online(&f);
}

/// A `--stock-final` run killed during the final activation, whose hydra-init then fails
/// on a row without jobset_id that an old evaluator wrote meanwhile: the host runs the
/// final system with Hydra down. The re-run's verify before finishing that switch is not
/// clean: it rolls back to the migration system (exit 10) instead of saying the host
/// stays on it, and the run after that backfills the row and finishes.
#[test]
fn a_resumed_final_switch_with_null_rows_rolls_back_to_the_migration_system() {
    let f = Fake::new(58);
    f.inject("final", "fail-init");
    let h = spawn_paused_at(&f, &["--stock-final"], "final");
    h.kill().unwrap();
    f.db.exec(
        "INSERT INTO builds (finished, timestamp, project, jobset, job, drvpath, system)
         SELECT 0, 0, project, jobset, job, '/nix/store/late.drv', 'x86_64-linux' FROM builds LIMIT 1",
    );
    std::fs::remove_file(f.state("pause-stc-final")).unwrap();
    wait_for("the final activation to end", || {
        f.state("units/hydra-upgrade-switch-final.service.rc")
            .exists()
    });
    let _ = h.wait();
    assert_eq!(f.current(), "final");
    assert_eq!(f.upgrade_state()["switching_to"], "final");
    // a dry run, without the flags that named the systems, shows what the re-run will do:
    // finish that switch (with the remembered final system), no online finalize
    let state_before = f.upgrade_state();
    let r = f.run_raw(&f.args(&["--dry-run"]), &[]);
    r.expect_code(0);
    assert_contains(&r.stdout, "== switch-final");
    assert_contains(&r.stdout, &f.system("final").display().to_string());
    assert!(!r.stdout.contains("== finalize"), "{}", r.stdout);
    assert_eq!(f.upgrade_state(), state_before, "a dry run writes no state");
    let r = f.run(&["--stock-final"]);
    r.expect_code(10);
    assert_contains(
        &r.stderr,
        "finish the switch to the hydra-unstable system that an earlier run began",
    );
    assert_contains(&r.stderr, "the final switch is refused");
    assert_contains(&r.stderr, "rolling back to");
    assert_eq!(f.current(), "migration");
    assert_eq!(f.db.version(), 61);
    assert!(f.upgrade_state()["switching_to"].is_null());
    std::fs::remove_file(f.system("final").join("fail-init")).unwrap();
    let r = f.run(&["--stock-final"]);
    r.expect_code(0);
    f.assert_final();
}

/// Right after an activation the host may fail to answer for a moment (over
/// `--target-host`, sshd restarting with the new system refuses connections): failed looks
/// at hydra-init and at Hydra's units are looked at again, not taken for a failed switch.
#[test]
fn a_host_that_does_not_answer_for_a_moment_after_a_switch_is_not_rolled_back() {
    let f = Fake::new(58);
    let h = spawn_paused_at(&f, &[], "migration");
    std::fs::write(f.state("fail-show-hydra-init.service"), "3").unwrap();
    std::fs::write(f.state("fail-show-hydra-server.service"), "2").unwrap();
    std::fs::remove_file(f.state("pause-stc-migration")).unwrap();
    let out = h.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_contains(&stderr, "cannot ask systemd about hydra-init.service");
    assert!(!stderr.contains("rolling back"), "{stderr}");
    for unit in ["hydra-init", "hydra-server"] {
        let left = std::fs::read_to_string(f.state(&format!("fail-show-{unit}.service"))).unwrap();
        assert_eq!(left.trim(), "0", "{unit}: every injected failure was met");
    }
    f.assert_final();
}

/// The detached backfill is a system unit, which has neither `$HOME` nor `$USER`. A DSN
/// without `user=` and a password in `~/.pgpass` (an admin's root shell) work for the tool
/// itself; the unit gets the role and the pgpass file the tool resolved, and works too.
#[test]
fn the_backfill_unit_uses_the_role_and_pgpass_file_of_the_tool() {
    let f = Fake::new(58);
    let c = cluster();
    {
        let mut admin = c.connect("postgres").unwrap();
        admin
            .client()
            .batch_execute(
                "SET password_encryption = 'scram-sha-256';
                 DO $$ BEGIN CREATE ROLE pwadmin LOGIN SUPERUSER PASSWORD 'pgpass-s3cret';
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            )
            .unwrap();
    }
    c.prepend_hba("local all pwadmin scram-sha-256").unwrap();
    let home = f.root.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let pgpass = home.join(".pgpass");
    std::fs::write(
        &pgpass,
        format!("localhost:5432:{}:pwadmin:pgpass-s3cret\n", f.db.name),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let dsn = format!(
        "host={} port=5432 dbname={}",
        c.socket_dir().display(),
        f.db.name
    );
    let mut a = f.args(&["--yes"]);
    a.extend(f.systems_args());
    let out = f
        .expr_on(
            &dsn,
            &a,
            &[
                ("HOME", home.display().to_string()),
                ("USER", "pwadmin".into()),
            ],
        )
        .env_remove("PGUSER")
        .env_remove("PGPASSFILE")
        .run()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        f.calls().contains("--unit=hydra-upgrade-backfill"),
        "the backfill ran in its unit"
    );
    assert_contains(&stderr, "==> backfill");
    assert!(!stderr.contains("pgpass-s3cret"), "{stderr}");
    f.assert_final();
}

/// A Hydra URL this machine cannot reach while hydra-server runs (the default
/// `http://<target>:3000` behind the target's firewall) would fail the health check after
/// every switch and roll back switches that worked: the preflight refuses it, before
/// anything changes (exit 3).
#[test]
fn a_hydra_url_that_does_not_answer_while_hydra_runs_is_refused_before_any_switch() {
    let f = Fake::new(58);
    let mut a: Vec<String> = f
        .args(&["--yes"])
        .into_iter()
        .map(|arg| {
            if arg == hydra_url() {
                // nothing listens on port 1
                "http://127.0.0.1:1/".to_owned()
            } else {
                arg
            }
        })
        .collect();
    a.extend(f.systems_args());
    let r = f.run_raw(&a, &[]);
    r.expect_code(3);
    assert_contains(&r.stderr, "did not answer from here");
    assert_contains(&r.stderr, "pass --hydra-url");
    // a URL that cannot be checked at all is refused at once
    let a: Vec<String> = a
        .into_iter()
        .map(|arg| arg.replace("http://127.0.0.1:1/", "https://hydra.example/"))
        .collect();
    let r = f.run_raw(&a, &[]);
    r.expect_code(3);
    assert_contains(&r.stderr, "--hydra-url: only http:// URLs can be checked");
    assert_eq!(f.current(), "original");
    assert!(
        !f.calls().contains("switch-to-configuration"),
        "{}",
        f.calls()
    );
    assert_eq!(f.db.version(), 58);
}

#[test]
fn dry_run_prints_every_command_and_changes_nothing() {
    let f = Fake::new(58);
    let before = f.db.digest_without_jobset_id();
    let mut a = f.args(&["--dry-run"]);
    a.extend(f.systems_args());
    let r = f.run_raw(&a, &[]);
    r.expect_code(0);
    let m = f.system("migration").display().to_string();
    let fin = f.system("final").display().to_string();
    let o = &r.stdout;
    let order = [
        "readlink -f /run/current-system".to_owned(),
        format!("test -x {m}/bin/switch-to-configuration"),
        "systemctl show -p ActiveState hydra-server.service".into(),
        format!("GET {}", hydra_url()),
        format!("nix-env -p /nix/var/nix/profiles/system --set {m}"),
        format!("--unit=hydra-upgrade-switch-migration -- {m}/bin/switch-to-configuration switch"),
        "systemctl show -p ActiveState,Result,ExecMainStatus hydra-init.service".into(),
        "--unit=hydra-upgrade-backfill".into(),
        "(database) verify".into(),
        format!("nix-env -p /nix/var/nix/profiles/system --set {fin}"),
    ];
    let mut at = 0;
    for needle in &order {
        let i = o[at..]
            .find(needle.as_str())
            .unwrap_or_else(|| panic!("`{needle}` missing after {at}:\n{o}"));
        at += i;
    }
    assert!(o.contains("nothing was changed"), "{o}");
    assert_eq!(f.calls(), "", "a dry run runs no host command");
    assert_eq!(f.db.version(), 58);
    assert_eq!(f.db.digest_without_jobset_id(), before);
    assert!(!f.root.join("upgrade-state/state.json").exists());
}

#[test]
fn without_a_terminal_and_without_yes_it_refuses() {
    let f = Fake::new(58);
    let mut a = f.args(&[]);
    a.extend(f.systems_args());
    let r = f.run_raw(&a, &[]);
    r.expect_code(13);
    assert_contains(&r.stderr, "run again with --yes");
    assert_eq!(f.db.version(), 58);
    assert_eq!(f.current(), "original");
}

#[test]
fn preflight_refuses_a_path_that_is_not_a_nixos_system() {
    let f = Fake::new(58);
    let a = f.args(&[
        "--migration-system",
        "/nonexistent/system",
        "--final-system",
        "/tmp",
        "--yes",
    ]);
    let r = f.run_raw(&a, &[]);
    r.expect_code(3);
    assert_contains(&r.stderr, "is not a NixOS system");
    assert_eq!(f.db.version(), 58);
    // no systems at all
    let r = f.run_raw(&f.args(&["--yes"]), &[]);
    r.expect_code(3);
    assert_contains(&r.stderr, "--flake REF");
}

#[test]
fn target_host_runs_every_host_command_over_ssh() {
    let f = Fake::new(61);
    let a = f.args(&[
        "--target-host",
        "root@hydra.example.org",
        "--flake",
        ".#hydra",
        "--yes",
    ]);
    f.run_raw(&a, &[]).expect_code(0);
    f.assert_final();
    let c = f.calls();
    // built here, then copied to the target (as nixos-rebuild --target-host does)
    let m = f.system("migration").display().to_string();
    assert!(
        pos(&c, "build --no-link --print-out-paths")
            < pos(&c, &format!("copy --to ssh://root@hydra.example.org {m} "))
    );
    for line in c.lines() {
        let local_ok = line.starts_with("ssh ")
            || line.starts_with("nix --extra-experimental-features")
            || line.starts_with("switch-to-configuration")
            || line.starts_with("readlink")
            || line.starts_with("systemd-run")
            || line.starts_with("systemctl")
            || line.starts_with("nix-env")
            || line.starts_with("journalctl");
        assert!(local_ok, "{line}");
    }
    assert!(
        c.contains("ssh root@hydra.example.org readlink -f /run/current-system"),
        "{c}"
    );
    assert!(c.contains("ssh root@hydra.example.org systemctl show -p ActiveState,Result,ExecMainStatus hydra-init.service"), "{c}");
    assert!(
        !c.contains("hydra-upgrade-backfill"),
        "over SSH the backfill runs here, in the foreground:\n{c}"
    );
    // every host command went through ssh: one ssh call per fake tool call (`test -x` is
    // not a fake, so it only shows as an ssh call)
    let ssh = c
        .lines()
        .filter(|l| l.starts_with("ssh ") && !l.contains(" test -x "))
        .count();
    let direct = c
        .lines()
        .filter(|l| {
            [
                "systemctl ",
                "nix-env ",
                "readlink ",
                "systemd-run ",
                "journalctl ",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .count();
    assert_eq!(ssh, direct, "{c}");
}

#[test]
fn killed_during_the_migration_switch_then_resumed() {
    let f = Fake::new(58);
    let h = spawn_paused_at(&f, &[], "migration");
    h.kill().unwrap();
    assert_eq!(f.upgrade_state()["switching_to"], "migration");
    // the activation runs on in its unit, as under systemd-run
    std::fs::remove_file(f.state("pause-stc-migration")).unwrap();
    let _ = h.wait();
    let r = f.run(&[]);
    r.expect_code(0);
    assert_contains(&r.stderr, "finishing that switch first");
    f.assert_final();
}

/// A re-run that connects as another role (another admin, a DSN without `user=`) names
/// the same database: the state file, and the switch it says is under way, are kept. A
/// run for another database refuses (exit 3) rather than forget that switch.
#[test]
fn a_pending_switch_outlives_another_role_and_is_not_dropped_for_another_database() {
    let f = Fake::new(58);
    let h = spawn_paused_at(&f, &[], "migration");
    h.kill().unwrap();
    std::fs::remove_file(f.state("pause-stc-migration")).unwrap();
    let _ = h.wait();
    assert_eq!(f.upgrade_state()["switching_to"], "migration");
    let other = hydra_at(58);
    let mut a = f.args(&["--yes"]);
    a.extend(f.systems_args());
    let out = f.expr_on(&other.dsn, &a, &[]).run().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_contains(
        &stderr,
        "a switch to the migration system is under way there",
    );
    assert_eq!(f.upgrade_state()["switching_to"], "migration");
    assert_eq!(other.version(), 58, "nothing done to the other database");
    cluster()
        .connect("postgres")
        .unwrap()
        .client()
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE other_admin LOGIN SUPERUSER;
             EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .unwrap();
    let as_other_role = f.db.dsn.replace("user=postgres", "user=other_admin");
    assert_ne!(as_other_role, f.db.dsn);
    let out = f.expr_on(&as_other_role, &a, &[]).run().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_contains(&stderr, "finishing that switch first");
    assert!(!stderr.contains("belongs to another database"), "{stderr}");
    f.assert_final();
}

#[test]
fn killed_during_the_final_switch_then_resumed_while_activation_still_runs() {
    let f = Fake::new(61);
    let h = spawn_paused_at(&f, &[], "final");
    h.kill().unwrap();
    // re-run while the activation is still paused: it waits for the running unit
    let (code, stderr) =
        rerun_past_a_paused_activation(&f, &[], "hydra-upgrade-switch-final", "final", || {});
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("still running; waiting for it"), "{stderr}");
    let _ = h.wait();
    f.assert_final();
    assert_eq!(
        f.calls()
            .matches("switch-to-configuration switch final")
            .count(),
        1
    );
}

/// Killed during a `--stock-final` activation whose hydra-init holds Builds' ACCESS
/// EXCLUSIVE lock (for hours on a large table): the re-run neither hangs without a word
/// counting NULL rows for its plan (the count gives up after a few seconds) nor in the
/// verify before finishing the switch; it says that the activation still runs and waits
/// for it, then finishes.
#[test]
fn a_rerun_during_a_stock_final_activation_that_holds_builds_waits_for_it_saying_so() {
    let f = Fake::new(61);
    let h = spawn_paused_at(&f, &["--stock-final"], "final");
    h.kill().unwrap();
    // as the final system's hydra-init would, from its first schema step on
    let mut init = f.db.connect();
    init.client()
        .batch_execute("BEGIN; LOCK TABLE builds IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let (code, stderr) = rerun_past_a_paused_activation(
        &f,
        &["--stock-final"],
        "hydra-upgrade-switch-final",
        "final",
        || init.client().batch_execute("COMMIT").unwrap(),
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_contains(
        &stderr,
        "finish the switch to the hydra-unstable system that an earlier run began",
    );
    assert_contains(&stderr, "still running; waiting for it");
    let _ = h.wait();
    f.assert_final();
}

#[test]
fn sigint_after_the_migration_switch_stops_then_resumes() {
    let f = Fake::new(58);
    let h = spawn_paused_at(&f, &[], "migration");
    for pid in h.pids() {
        kill(&pid.to_string(), "-INT");
    }
    std::fs::remove_file(f.state("pause-stc-migration")).unwrap();
    let out = h.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_eq!(f.db.version(), 61);
    assert_eq!(f.current(), "migration");
    f.run(&[]).expect_code(0);
    f.assert_final();
}

#[test]
fn an_ssh_drop_during_the_backfill_leaves_it_running_and_a_rerun_follows_it() {
    let f = Fake::new(61);
    // Our output goes to a pipe that the dropped session takes away, as its terminal.
    let (reader, writer) = std::io::pipe().unwrap();
    let mut a = f.args(&SLOW_BACKFILL);
    a.extend(f.systems_args());
    a.push("--yes".into());
    let h = f
        .expr_uncaptured(&a, &[])
        .stdout_file(writer.try_clone().unwrap())
        .stderr_file(writer)
        .start()
        .unwrap();
    let pid_file = f.state("units/hydra-upgrade-backfill.service.pid");
    wait_for("the backfill unit", || pid_file.exists());
    // the session goes away: our process, the systemd-run client and the terminal
    let client =
        std::fs::read_to_string(f.state("units/hydra-upgrade-backfill.service.client-pid"))
            .unwrap();
    let journal = f.state("journal/hydra-upgrade-backfill.service");
    wait_for("one journal follower", || {
        processes_naming(&journal).len() == 1
    });
    h.kill().unwrap();
    kill(&client, "-KILL");
    // Our journal follower ends with us, even killed outright (while the terminal is
    // still there to write to).
    wait_for("the journal follower to end", || {
        processes_naming(&journal).is_empty()
    });
    drop(reader);
    let unit_pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(
        alive(&unit_pid),
        "the backfill unit must survive the dropped session"
    );
    let r = f.run(&SLOW_BACKFILL);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "hydra-upgrade-backfill.service, started by an earlier run, is still running",
    );
    f.assert_final();
    // The unit ran to its end, its output in its journal, not in the session that went
    // away.
    let history =
        std::fs::read_to_string(f.state("units/hydra-upgrade-backfill.service.rc-history"))
            .unwrap();
    assert_eq!(history.lines().next(), Some("0"), "{history}");
    let _ = h.wait();
}

#[test]
fn foreground_backfill_runs_in_the_process() {
    let f = Fake::new(61);
    f.run(&["--foreground-backfill"]).expect_code(0);
    f.assert_final();
    assert!(!f.calls().contains("hydra-upgrade-backfill"));
}

/// Start a slow upgrade, let its backfill unit run a moment, `stop` it: we end with exit
/// 130, the unit stopped before the end (rows left, schema 61), and the re-run finishes.
fn backfill_unit_stopped_midway(f: &Fake, stop: impl Fn(&duct::Handle)) {
    let h = f.spawn(&SLOW_BACKFILL);
    let pid_file = f.state("units/hydra-upgrade-backfill.service.pid");
    wait_for("the backfill unit", || pid_file.exists());
    std::thread::sleep(Duration::from_millis(300));
    stop(&h);
    let out = h.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert_contains(&stderr, "systemctl stop hydra-upgrade-backfill.service");
    let unit_pid = std::fs::read_to_string(&pid_file).unwrap();
    assert!(!alive(&unit_pid), "the backfill unit must be stopped");
    assert!(f.db.wrong_or_null() > 0, "stopped before the end");
    assert_eq!(f.db.version(), 61);
    f.run(&SLOW_BACKFILL).expect_code(0);
    f.assert_final();
}

#[test]
fn ctrl_c_during_the_backfill_stops_its_unit_then_resumes() {
    let f = Fake::new(61);
    backfill_unit_stopped_midway(&f, |h| ctrl_c(&f, h, "hydra-upgrade-backfill"));
}

/// A SIGTERM to the tool alone (not to the systemd-run client, which runs in a process
/// group of its own) stops the backfill unit at once, not when the backfill ends.
#[test]
fn sigterm_to_the_tool_alone_stops_the_backfill_unit() {
    let f = Fake::new(61);
    backfill_unit_stopped_midway(&f, |h| {
        for pid in h.pids() {
            kill(&pid.to_string(), "-TERM");
        }
    });
}

#[test]
fn ctrl_c_during_an_activation_does_not_roll_back_and_a_rerun_finishes_the_switch() {
    let f = Fake::new(58);
    let h = spawn_paused_at(&f, &[], "migration");
    ctrl_c(&f, &h, "hydra-upgrade-switch-migration");
    let out = h.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("the activation continues in its systemd unit"),
        "{stderr}"
    );
    assert!(
        !f.calls().contains("--unit=hydra-upgrade-switch-rollback"),
        "{}",
        f.calls()
    );
    assert_eq!(f.upgrade_state()["switching_to"], "migration");
    // the activation ends on its own, as under systemd
    std::fs::remove_file(f.state("pause-stc-migration")).unwrap();
    wait_for("the activation to end", || {
        f.state("units/hydra-upgrade-switch-migration.service.rc")
            .exists()
    });
    assert_eq!(f.current(), "migration");
    let r = f.run(&[]);
    r.expect_code(0);
    assert_contains(&r.stderr, "already runs the migration system");
    f.assert_final();
    assert_eq!(
        f.calls()
            .matches("switch-to-configuration switch migration")
            .count(),
        1
    );
}

#[test]
fn a_system_that_never_starts_hydra_init_is_rolled_back() {
    let f = Fake::new(58);
    f.inject("migration", "no-init");
    let r = f.run(&[]);
    r.expect_code(10);
    assert_contains(&r.stderr, "hydra-init.service stayed inactive");
    assert_eq!(f.current(), "original");
    assert_eq!(f.db.version(), 58);
}

#[test]
fn sigkill_at_arbitrary_moments_then_a_rerun_finishes() {
    let f = Fake::new(58);
    let slow = [
        "--strategy",
        "keyset",
        "--batch-size",
        "1000",
        "--max-batch-size",
        "1000",
        "--pause-ms",
        "30",
    ];
    for delay in [100, 350, 700, 1100, 1600, 2200] {
        let h = f.spawn(&slow);
        std::thread::sleep(Duration::from_millis(delay));
        h.kill().unwrap();
        let _ = h.wait();
    }
    let r = f.run(&slow);
    r.expect_code(0);
    f.assert_final();
    assert!(f.upgrade_state()["switching_to"].is_null());
}

#[test]
fn dry_run_with_a_flake_lists_the_build_first() {
    let f = Fake::new(61);
    let a = f.args(&["--dry-run", "--flake", ".#hydra", "--target-host", "root@h"]);
    let r = f.run_raw(&a, &[]);
    r.expect_code(0);
    let o = &r.stdout;
    let build = pos(
        o,
        "build --no-link --print-out-paths '.#nixosConfigurations.\"hydra\".config.system.build.hydraUpgrade.migration'",
    );
    let copy = pos(
        o,
        "copy --to ssh://root@h '<migration system>' '<final system>'",
    );
    let first_ssh = pos(
        o,
        "ssh -o BatchMode=yes -o ServerAliveInterval=15 root@h -- 'readlink -f /run/current-system'",
    );
    assert!(build < copy && copy < first_ssh, "{o}");
    assert!(
        !o.contains("hydra-upgrade-backfill"),
        "over SSH the backfill runs here:\n{o}"
    );
    assert_eq!(f.calls(), "", "a dry run builds nothing");
}

#[test]
fn a_host_already_on_a_failing_migration_system_is_not_rolled_back_to_itself() {
    let f = Fake::new(58);
    // The admin switched by hand; hydra-init failed there.
    std::fs::remove_file(f.state("current-system")).unwrap();
    std::os::unix::fs::symlink(f.system("migration"), f.state("current-system")).unwrap();
    std::fs::write(
        f.state("units/hydra-init.service"),
        "LoadState=loaded\nActiveState=failed\nResult=exit-code\nExecMainStatus=1\n",
    )
    .unwrap();
    std::fs::write(
        f.state("journal/hydra-init.service"),
        "hydra-init[1]: schema upgrade failed: by hand\n",
    )
    .unwrap();
    let r = f.run(&[]);
    r.expect_code(11);
    assert_contains(&r.stderr, "nothing to roll back to");
    assert_contains(&r.stderr, "schema upgrade failed: by hand");
    assert!(
        !f.calls().contains("switch-to-configuration"),
        "{}",
        f.calls()
    );
}

#[test]
fn json_mode_gives_events_and_a_final_report() {
    let f = Fake::new(61);
    let r = f.run(&["--json"]);
    r.expect_code(0);
    let (events, doc) = r.json_lines();
    assert_eq!(doc["final_status"]["schema_version"], 65);
    assert_eq!(doc["switches"][0]["phase"], "final");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "step_done" && e["step"] == "backfill")
    );
    // The backfill ran in its unit: its report came back through the state directory.
    let tables = doc["backfills"][0]["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2, "{doc}");
    assert_eq!(tables[1]["table"], "builds", "{doc}");
    assert!(tables[1]["rows_updated"].as_u64().unwrap() > 0, "{doc}");
    assert!(!f.root.join("upgrade-state/backfill-report.json").exists());
    f.assert_final();
}
