//! The real NixOS host: activates a phase's system like `nixos-rebuild` (profile, then
//! `switch-to-configuration` under `systemd-run`), waits for `hydra-init.service`, checks
//! Hydra's health, and rolls back to the system that ran before when anything fails.
//! Every command goes through [`crate::exec::Cmd`], optionally over SSH (`--target-host`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::commands::{self as c, Target};
use super::http;
use super::state::StateFile;
use super::{Detached, Host, Phase, SwitchReport};
use crate::cli::SwitchMode;
use crate::exec::{Cmd, Running};
use crate::exit::{Exit, exit_of, fail};
use crate::interrupt::Interrupt;
use crate::progress::Out;

/// How to run the backfill in its own transient unit.
#[derive(Debug, Clone)]
pub struct DetachedBackfill {
    /// The hydra-upgrade invocation (`/path/to/hydra-upgrade --config ... backfill ...`).
    pub argv: Vec<String>,
    /// `NAME=value` pairs for the unit's EnvironmentFile (the DSN, PGPASSWORD, ...).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub target: Target,
    pub mode: SwitchMode,
    /// Toplevels of the migration and final systems (index by [`idx`]).
    pub systems: [Option<PathBuf>; 2],
    /// Per-phase switch hooks, run locally with `sh -c` instead of profile + activation.
    pub hooks: [Option<String>; 2],
    pub hydra_url: String,
    pub init_timeout: Duration,
    pub health_timeout: Duration,
    pub poll: Duration,
    /// Run the backfill as the unit `hydra-upgrade-backfill` (None: in this process).
    pub detached_backfill: Option<DetachedBackfill>,
}

pub fn idx(phase: Phase) -> usize {
    match phase {
        Phase::Migration => 0,
        Phase::Final => 1,
    }
}

pub fn label(phase: Phase) -> &'static str {
    match phase {
        Phase::Migration => "migration",
        Phase::Final => "final",
    }
}

/// Polls of an `inactive` hydra-init after a switch before giving up (it should be
/// activating or done).
const INACTIVE_POLLS: u32 = 30;
/// How long the host may fail to answer `systemctl show` while hydra-init is waited for
/// before that ends the wait (and the switch is rolled back).
const UNANSWERED_GRACE: Duration = Duration::from_secs(60);
/// The label of the rollback's activation unit (`hydra-upgrade-switch-rollback`).
const ROLLBACK: &str = "rollback";

pub struct NixosHost {
    pub settings: Settings,
    pub state: StateFile,
    interrupt: Interrupt,
}

/// An exit code of a child hydra-upgrade, back to our [`Exit`].
fn exit_from_code(code: i32) -> Exit {
    Exit::ALL
        .iter()
        .map(|(e, _)| *e)
        .find(|e| i32::from(e.code()) == code)
        .unwrap_or(Exit::Internal)
}

impl NixosHost {
    pub fn new(settings: Settings, state: StateFile, interrupt: Interrupt) -> NixosHost {
        NixosHost {
            settings,
            state,
            interrupt,
        }
    }

    fn on(&self, cmd: Cmd) -> Cmd {
        self.settings.target.on(cmd)
    }

    fn system(&self, phase: Phase) -> Option<&Path> {
        self.settings.systems[idx(phase)].as_deref()
    }

    /// The store path of the running system.
    pub fn current(&self) -> Result<PathBuf> {
        let out = self.on(c::current_system()).run().map_err(|e| {
            fail(
                Exit::HostFailed,
                format!(
                    "cannot read {} on {}: {e:#}. Is it a NixOS machine (and reachable)?",
                    c::CURRENT_SYSTEM,
                    self.settings.target.describe()
                ),
            )
        })?;
        Ok(PathBuf::from(out.stdout.trim()))
    }

    fn show(&self, unit: &str, props: &[&str]) -> Result<Vec<(String, String)>> {
        let out = self.on(c::unit_show(unit, props)).run()?;
        Ok(c::parse_show(&out.stdout))
    }

    fn prop<'a>(kv: &'a [(String, String)], key: &str) -> &'a str {
        kv.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// The last journal lines of a unit, for error messages (best effort).
    fn journal(&self, unit: &str) -> String {
        match self.on(c::journal(unit, 20)).run() {
            Ok(o) if !o.stdout.trim().is_empty() => {
                format!("\nlast journal lines of {unit}:\n{}", o.stdout.trim_end())
            }
            Ok(_) => format!("\n(the journal of {unit} is empty)"),
            Err(e) => format!("\n(cannot read the journal of {unit}: {e:#})"),
        }
    }

    fn sleep(&self) -> Result<()> {
        self.interrupt.check(
            "The host keeps its current system; run `hydra-upgrade upgrade` again to continue.",
        )?;
        std::thread::sleep(self.settings.poll);
        Ok(())
    }

    /// Wait while a transient unit of ours (an activation or the backfill) still runs;
    /// while the backfill's does, show its journal.
    fn wait_unit_gone(&self, unit: &str, out: &Out) -> Result<bool> {
        let mut said = false;
        let mut following = None;
        let result = loop {
            let kv = match self.show(&format!("{unit}.service"), &["ActiveState"]) {
                Ok(kv) => kv,
                Err(e) => break Err(e),
            };
            let state = Self::prop(&kv, "ActiveState");
            if !matches!(
                state,
                "active" | "activating" | "deactivating" | "reloading"
            ) {
                break Ok(said);
            }
            if !said {
                let shown = if unit == c::BACKFILL_UNIT {
                    following = follow_journal(unit, out);
                    "its progress follows, from its journal"
                } else {
                    // An activation's output went to the run that started it (--pipe).
                    "`systemctl status` shows its state"
                };
                out.say(&format!(
                    "{unit}.service, started by an earlier run, is still running; waiting for it \
                     ({shown})"
                ));
                said = true;
            }
            if let Err(e) = self.sleep() {
                break Err(e);
            }
        };
        stop_following(following);
        result
    }

    /// Wait while an activation an earlier run started still runs: the one to `phase`, or
    /// a rollback (an interrupted run leaves it going on in its unit), so that no two
    /// activations overlap.
    fn wait_switch_units(&self, phase: Phase, out: &Out) -> Result<()> {
        for unit in [c::switch_unit(label(phase)), c::switch_unit(ROLLBACK)] {
            self.wait_unit_gone(&unit, out)?;
        }
        Ok(())
    }

    /// Run the `systemd-run --wait` client of a unit to its end, looking every 100 ms for a
    /// stop asked for (Ctrl-C, or a SIGTERM to us alone, which the client never sees):
    /// then it returns at once, the unit still running, for the caller to stop. The
    /// client's exit code otherwise (`None`: a signal ended it).
    fn wait_for_client(&self, cmd: &Cmd) -> Result<Option<i32>> {
        let client = cmd.start_to_stderr()?;
        loop {
            if self.interrupt.requested() {
                return Ok(None);
            }
            if let Some(code) = client.try_code()? {
                return Ok(code);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll hydra-init.service until the oneshot has finished: `active` with
    /// `Result=success` is done; `failed` (or active with another result) is a failure.
    pub fn wait_hydra_init(&self, out: &Out) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        let mut inactive_polls = 0;
        let mut unanswered_since: Option<Instant> = None;
        loop {
            let kv = match self.show(c::HYDRA_INIT, &["ActiveState", "Result", "ExecMainStatus"]) {
                Ok(kv) => {
                    unanswered_since = None;
                    kv
                }
                Err(e) => {
                    // One failed look (an SSH connection refused while sshd restarts with
                    // the new system) is no verdict on the switch: look again, for a while.
                    let first = unanswered_since.is_none();
                    let since = *unanswered_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNANSWERED_GRACE
                        || start.elapsed() > self.settings.init_timeout
                    {
                        return Err(e.context(format!(
                            "asking systemd about {} (no answer for {}s)",
                            c::HYDRA_INIT,
                            since.elapsed().as_secs()
                        )));
                    }
                    if first {
                        out.warn(&format!(
                            "cannot ask systemd about {} ({e:#}); asking again for up to {}s",
                            c::HYDRA_INIT,
                            UNANSWERED_GRACE.as_secs()
                        ));
                    }
                    self.sleep()?;
                    continue;
                }
            };
            let (state, result, status) = (
                Self::prop(&kv, "ActiveState"),
                Self::prop(&kv, "Result"),
                Self::prop(&kv, "ExecMainStatus"),
            );
            let now = format!("{state}/{result}");
            if now != last {
                out.say(&format!(
                    "hydra-init.service: {state} (result {result}, exit status {status})"
                ));
                last = now;
            }
            match state {
                "active" if result == "success" || result.is_empty() => return Ok(()),
                "active" | "failed" => {
                    anyhow::bail!(
                        "hydra-init.service failed (result {result}, exit status {status}): the \
                         schema upgrade of the new package did not complete"
                    )
                }
                "inactive" => {
                    inactive_polls += 1;
                    if inactive_polls > INACTIVE_POLLS {
                        anyhow::bail!(
                            "hydra-init.service stayed inactive after the switch: the new system \
                             did not start it (is services.hydra enabled in it?)"
                        );
                    }
                }
                _ => inactive_polls = 0,
            }
            if start.elapsed() > self.settings.init_timeout {
                anyhow::bail!(
                    "hydra-init.service did not finish within {}s (still {state}); raise \
                     --hydra-init-timeout-secs if its schema upgrade legitimately takes longer",
                    self.settings.init_timeout.as_secs()
                );
            }
            self.sleep()?;
        }
    }

    /// Before anything changes: if hydra-server runs, its URL must answer from here (any
    /// HTTP status). The health check after each switch probes that URL and rolls the
    /// switch back when it does not answer, so a URL this machine cannot reach (the
    /// default `http://<target>:3000` behind a firewall, or a hydra-server listening on
    /// localhost only) would roll back switches that worked. Not while a switch is
    /// pending: Hydra may be down mid-activation, which the re-run handles.
    fn check_hydra_url_reachable(&self) -> Result<()> {
        if self.pending_switch().is_some() {
            return Ok(());
        }
        // A URL that cannot be checked at all is a configuration error, not worth waiting.
        http::parse_url(&self.settings.hydra_url)
            .map_err(|e| fail(Exit::Config, format!("--hydra-url: {e:#}")))?;
        let start = Instant::now();
        loop {
            let kv = self.show("hydra-server.service", &["ActiveState"])?;
            if Self::prop(&kv, "ActiveState") != "active" {
                return Ok(());
            }
            let err = match http::get_status(&self.settings.hydra_url, Duration::from_secs(5)) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if start.elapsed() >= self.settings.health_timeout {
                return Err(fail(
                    Exit::Config,
                    format!(
                        "hydra-server.service is active on {}, yet {} did not answer from here \
                         within {}s ({err:#}). The health check after each switch probes this \
                         URL and rolls the switch back when it does not answer: if Hydra is \
                         still starting, run again in a while (or raise --health-timeout-secs); \
                         else pass --hydra-url (or hydra_url in the config file) with an address \
                         of Hydra that this machine reaches. Nothing was changed.",
                        self.settings.target.describe(),
                        self.settings.hydra_url,
                        self.settings.health_timeout.as_secs()
                    ),
                ));
            }
            self.sleep()?;
        }
    }

    /// One round of health checks: the list of problems (empty = healthy).
    fn health_problems(&self) -> Result<Vec<(String, Option<String>)>> {
        let mut problems = Vec::new();
        for unit in c::HYDRA_UNITS {
            // A failed look is a problem like any other: retried until the health timeout.
            let kv = match self.show(unit, &["LoadState", "ActiveState"]) {
                Ok(kv) => kv,
                Err(e) => {
                    problems.push((format!("cannot ask systemd about {unit}: {e:#}"), None));
                    continue;
                }
            };
            let (load, active) = (Self::prop(&kv, "LoadState"), Self::prop(&kv, "ActiveState"));
            if load != "loaded" {
                if unit == "hydra-server.service" {
                    problems.push((format!("{unit} is not known ({load})"), None));
                }
                continue;
            }
            if active != "active" {
                problems.push((format!("{unit} is {active}"), Some(unit.to_owned())));
            }
        }
        match http::get_status(&self.settings.hydra_url, Duration::from_secs(5)) {
            Ok(code) if code < 500 => {}
            Ok(code) => problems.push((
                format!(
                    "hydra-server answered HTTP {code} on {}",
                    self.settings.hydra_url
                ),
                Some("hydra-server.service".into()),
            )),
            Err(e) => problems.push((
                format!(
                    "hydra-server does not answer on {}: {e:#}",
                    self.settings.hydra_url
                ),
                Some("hydra-server.service".into()),
            )),
        }
        Ok(problems)
    }

    fn activate(&mut self, phase: Phase, out: &Out) -> Result<()> {
        let sys = self.system(phase).map(Path::to_owned);
        if let Some(hook) = self.settings.hooks[idx(phase)].clone() {
            let cmd = c::hook(&hook, label(phase), sys.as_deref());
            out.say(&format!(
                "running the {} switch hook: {}",
                label(phase),
                cmd.display()
            ));
            return cmd
                .run_inherit()
                .with_context(|| format!("the {} switch hook failed", label(phase)));
        }
        let sys =
            sys.ok_or_else(|| fail(Exit::Config, format!("no {} system is known", label(phase))))?;
        if self.settings.mode == SwitchMode::Switch {
            let cmd = self.on(c::set_profile(&sys));
            out.say(&format!("$ {}", cmd.display()));
            cmd.run().context("setting the system profile")?;
        }
        self.wait_unit_gone(&c::switch_unit(label(phase)), out)?;
        let cmd = self.on(c::activate(&sys, self.settings.mode, label(phase)));
        out.say(&format!("$ {}", cmd.display()));
        cmd.run_inherit().context("switch-to-configuration failed")
    }

    fn record(&mut self, f: impl FnOnce(&mut super::state::State)) -> Result<()> {
        f(&mut self.state.state);
        self.state.save()
    }
}

impl Host for NixosHost {
    fn describe(&self) -> String {
        match &self.settings.target {
            Target::Local => "this NixOS machine".into(),
            Target::Ssh(dest) => format!("the NixOS host {dest}"),
        }
    }

    fn preflight(&mut self, out: &Out) -> Result<()> {
        let current = self.current()?;
        out.say(&format!(
            "host {}: running {}",
            self.settings.target.describe(),
            current.display()
        ));
        for phase in [Phase::Migration, Phase::Final] {
            match self.system(phase).map(Path::to_owned) {
                Some(sys) => {
                    self.on(c::is_nixos_system(&sys)).run().map_err(|_| {
                        fail(
                            Exit::Config,
                            format!(
                                "the {} system {} is not a NixOS system on {} (no \
                                 bin/switch-to-configuration): build it first, or check the path",
                                label(phase),
                                sys.display(),
                                self.settings.target.describe()
                            ),
                        )
                    })?;
                    out.say(&format!("{} system: {}", label(phase), sys.display()));
                }
                None if self.settings.hooks[idx(phase)].is_some() => {
                    out.say(&format!("{} system: switched by its hook", label(phase)))
                }
                None => {
                    return Err(fail(
                        Exit::Config,
                        format!(
                            "no {} system: pass --migration-system and --final-system, or \
                             --flake REF, or enable the NixOS module (it writes both to \
                             /etc/hydra-upgrade/config.json), or give --{}-switch-command",
                            label(phase),
                            label(phase)
                        ),
                    ));
                }
            }
        }
        for unit in [c::HYDRA_INIT, "hydra-server.service"] {
            let kv = self.show(unit, &["LoadState"]).map_err(|e| {
                fail(
                    Exit::HostFailed,
                    format!("cannot ask systemd about {unit}: {e:#}"),
                )
            })?;
            if Self::prop(&kv, "LoadState") != "loaded" {
                return Err(fail(
                    Exit::Environment,
                    format!(
                        "{unit} is not known to systemd on {}: is services.hydra enabled in the \
                         running system?",
                        self.settings.target.describe()
                    ),
                ));
            }
        }
        self.check_hydra_url_reachable()?;
        let systems = self.settings.systems.clone();
        self.record(|s| {
            s.migration_system = systems[0].clone();
            s.final_system = systems[1].clone();
        })
    }

    fn is_on(&mut self, phase: Phase) -> Result<bool> {
        let current = self.current()?;
        Ok(match self.system(phase) {
            Some(sys) => current == sys,
            None => {
                let s = &self.state.state;
                let switched = match phase {
                    Phase::Migration => &s.switched_migration,
                    Phase::Final => &s.switched_final,
                };
                switched.as_deref() == Some(current.as_path())
            }
        })
    }

    fn rolled_back_from_migration(&mut self) -> Result<bool> {
        Ok(
            self.state.state.rolled_back_from.as_deref() == Some(label(Phase::Migration))
                && !self.is_on(Phase::Migration)?
                && !self.is_on(Phase::Final)?,
        )
    }

    fn moved_on_from_final(&mut self) -> Result<bool> {
        if self.state.state.switched_final.is_none()
            || self.is_on(Phase::Final)?
            || self.is_on(Phase::Migration)?
        {
            return Ok(false);
        }
        // Not moved on but back: the system from before the upgrade (a `--mode test`
        // switch undone by a reboot, a boot into an older generation), or any system whose
        // hydra-init fails (an older Hydra's, refused at schema 65 by the schema guard).
        if self.state.state.before_upgrade.as_deref() == Some(self.current()?.as_path()) {
            return Ok(false);
        }
        let kv = self.show(c::HYDRA_INIT, &["ActiveState"])?;
        Ok(Self::prop(&kv, "ActiveState") != "failed")
    }

    fn pending_switch_began(&mut self) -> Result<bool> {
        let Some(previous) = self.state.state.previous_system.clone() else {
            return Ok(false);
        };
        Ok(self.pending_switch().is_some() && self.current()? != previous)
    }

    fn await_running_switch(&mut self, phase: Phase, out: &Out) -> Result<()> {
        self.wait_switch_units(phase, out)
    }

    fn pending_switch(&self) -> Option<Phase> {
        match self.state.state.switching_to.as_deref() {
            Some("migration") => Some(Phase::Migration),
            Some("final") => Some(Phase::Final),
            _ => None,
        }
    }

    fn prepare_switch(&mut self, phase: Phase, out: &Out) -> Result<()> {
        let previous = self.current()?;
        if let Some(sys) = self.system(phase) {
            self.on(c::is_nixos_system(sys)).run().map_err(|_| {
                fail(
                    Exit::Config,
                    format!(
                        "the {} system {} is gone from {} (garbage-collected?): build it again",
                        label(phase),
                        sys.display(),
                        self.settings.target.describe()
                    ),
                )
            })?;
        }
        out.say(&format!(
            "remembering the running system {} to roll back to",
            previous.display()
        ));
        self.record(|s| {
            if phase == Phase::Migration && s.before_upgrade.is_none() {
                s.before_upgrade = Some(previous.clone());
            }
            s.previous_system = Some(previous);
        })
    }

    fn abort_switch(&mut self) -> Result<()> {
        self.record(|s| {
            s.switching_to = None;
            s.previous_system = None;
        })
    }

    fn switch(&mut self, phase: Phase, out: &Out) -> Result<SwitchReport> {
        let start = Instant::now();
        if self.pending_switch() != Some(phase) {
            if self.state.state.previous_system.is_none() {
                self.prepare_switch(phase, out)?;
            }
            // From here on the switch is under way: a re-run finishes (or rolls back) it.
            self.record(|s| s.switching_to = Some(label(phase).to_owned()))?;
        }
        // An activation an earlier run started may still be running in its unit.
        self.wait_switch_units(phase, out)?;
        let already = match self.system(phase) {
            Some(sys) => self.current()? == sys,
            None => false,
        };
        let result = if already {
            out.say(&format!(
                "the host already runs the {} system; waiting for its hydra-init",
                label(phase)
            ));
            self.wait_hydra_init(out)
        } else {
            self.activate(phase, out)
                .and_then(|()| self.wait_hydra_init(out))
        };
        if let Err(e) = result {
            if exit_of(&e) == Exit::Interrupted || self.interrupt.requested() {
                // The activation goes on in its unit; the state file remembers the switch,
                // and the next run finishes (or rolls back) it.
                return Err(fail(
                    Exit::Interrupted,
                    format!(
                        "interrupted during the switch ({e:#}); the activation continues in its \
                         systemd unit. Run `hydra-upgrade upgrade` again to finish the switch (it \
                         checks hydra-init and health, and rolls back if needed)."
                    ),
                ));
            }
            return Err(self.roll_back(phase, out, e));
        }
        Ok(SwitchReport {
            phase,
            seconds: start.elapsed().as_secs_f64(),
            schema_steps: Vec::new(),
        })
    }

    fn check_health(&mut self, out: &Out) -> Result<()> {
        let start = Instant::now();
        loop {
            let problems = self.health_problems()?;
            if problems.is_empty() {
                out.say(&format!(
                    "Hydra is healthy: its units are active and {} answers",
                    self.settings.hydra_url
                ));
                return Ok(());
            }
            if start.elapsed() > self.settings.health_timeout {
                let mut msg = format!(
                    "Hydra is not healthy after {}s: {}",
                    self.settings.health_timeout.as_secs(),
                    problems
                        .iter()
                        .map(|(p, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                if let Some(unit) = problems.iter().find_map(|(_, u)| u.clone()) {
                    msg.push_str(&self.journal(&unit));
                }
                anyhow::bail!(msg);
            }
            self.sleep()?;
        }
    }

    fn switch_confirmed(&mut self, phase: Phase) -> Result<()> {
        let current = self.current()?;
        self.record(|s| {
            s.switching_to = None;
            s.previous_system = None;
            s.rolled_back_from = None;
            match phase {
                Phase::Migration => s.switched_migration = Some(current),
                Phase::Final => s.switched_final = Some(current),
            }
        })
    }

    fn roll_back(&mut self, phase: Phase, out: &Out, why: anyhow::Error) -> anyhow::Error {
        let journal = self.journal("hydra-init");
        let Some(previous) = self.state.state.previous_system.clone() else {
            return fail(
                Exit::HostFailed,
                format!(
                    "switching to the {} system failed: {why:#}{journal}\nNo previous system is \
                     known, so nothing was rolled back.",
                    label(phase)
                ),
            );
        };
        if self.system(phase) == Some(previous.as_path()) {
            if let Err(e) = self.record(|s| s.switching_to = None) {
                out.warn(&format!("{e:#}"));
            }
            return fail(
                Exit::HostFailed,
                format!(
                    "the {} system failed: {why:#}{journal}\nThe host already ran this system \
                     before, so there is nothing to roll back to. Fix the cause (see the journal \
                     lines above), `systemctl restart hydra-init.service`, then run \
                     `hydra-upgrade upgrade` again.",
                    label(phase)
                ),
            );
        }
        out.warn(&format!(
            "switching to the {} system failed; rolling back to {}",
            label(phase),
            previous.display()
        ));
        let mut steps = Vec::new();
        if self.settings.mode == SwitchMode::Switch {
            steps.push(self.on(c::set_profile(&previous)));
        }
        steps.push(self.on(c::activate(&previous, self.settings.mode, ROLLBACK)));
        let last = steps.len() - 1;
        for (i, cmd) in steps.into_iter().enumerate() {
            out.say(&format!("$ {}", cmd.display()));
            if let Err(e) = cmd.run_inherit() {
                if self.interrupt.requested() {
                    // Ctrl-C reached the systemd-run client, not the activation: the switch
                    // stays pending, and the re-run waits for the rollback's unit, then makes
                    // the switch again (and rolls back if it still fails).
                    let where_ = if i == last {
                        format!(
                            "its activation goes on in {}.service",
                            c::switch_unit(ROLLBACK)
                        )
                    } else {
                        "no activation of it had begun".to_owned()
                    };
                    return fail(
                        Exit::Interrupted,
                        format!(
                            "switching to the {} system failed: {why:#}{journal}\nInterrupted \
                             while rolling back to {} ({e:#}): {where_}. Run `hydra-upgrade \
                             upgrade` again: it waits for any activation still running, then \
                             switches to the {} system again (rolling back once more if it still \
                             fails); or roll back by hand: {}.",
                            label(phase),
                            previous.display(),
                            label(phase),
                            roll_back_by_hand(&previous)
                        ),
                    );
                }
                return fail(
                    Exit::HostFailed,
                    format!(
                        "switching to the {} system failed: {why:#}{journal}\nRolling back to {} \
                         failed too: {e:#}\nIf the older system's hydra-init refuses the newer \
                         schema (the module's schema guard does so on purpose), go forward \
                         instead: fix the cause and run `hydra-upgrade upgrade` again. To roll \
                         back by hand: {}, then `systemctl status 'hydra-*'`.",
                        label(phase),
                        previous.display(),
                        roll_back_by_hand(&previous)
                    ),
                );
            }
        }
        if let Err(e) = self.record(|s| {
            s.switching_to = None;
            s.rolled_back_from = Some(label(phase).to_owned());
        }) {
            out.warn(&format!("{e:#}"));
        }
        fail(
            Exit::RolledBack,
            format!(
                "switching to the {} system failed: {why:#}{journal}\nRolled back: the host runs \
                 {} again. The database keeps what hydra-init committed (`hydra-upgrade status` \
                 shows it). Fix the cause, then run `hydra-upgrade upgrade` again.",
                label(phase),
                previous.display()
            ),
        )
    }

    fn record_step(&mut self, step: &str, seconds: Option<f64>) -> Result<()> {
        match seconds {
            None => self.state.step(step),
            Some(s) => self.state.timing(step, s),
        }
    }

    fn follow_running_backfill(&mut self, out: &Out) -> Result<()> {
        if self.settings.detached_backfill.is_none() {
            return Ok(());
        }
        if self.wait_unit_gone(c::BACKFILL_UNIT, out)? {
            out.say("the earlier backfill has ended; continuing");
        }
        Ok(())
    }

    fn detached_backfill(&mut self, out: &Out) -> Result<Option<Detached>> {
        let Some(d) = self.settings.detached_backfill.clone() else {
            return Ok(None);
        };
        let dir = self
            .state
            .dir()
            .map(Path::to_owned)
            .context("no state directory for the backfill's environment file")?;
        let env_file = dir.join("backfill.env");
        write_env_file(&env_file, &d.env)?;
        // The unit's report comes back through a file: its output is the journal's.
        let report_file = dir.join("backfill-report.json");
        let _ = std::fs::remove_file(&report_file);
        let mut argv = d.argv.clone();
        argv.extend(["--report-file".into(), report_file.display().to_string()]);
        let cmd = c::backfill_unit(&env_file, &argv);
        out.say(&format!(
            "running the backfill as {}.service so that a dropped session cannot stop it; \
             its progress goes to its journal (`journalctl -fu {}`), shown here while we \
             wait\n$ {}",
            c::BACKFILL_UNIT,
            c::BACKFILL_UNIT,
            cmd.display()
        ));
        let following = follow_journal(c::BACKFILL_UNIT, out);
        let code = self.wait_for_client(&cmd);
        let _ = std::fs::remove_file(&env_file);
        if self.interrupt.requested() {
            // Ctrl-C or SIGTERM means stop the backfill, not only our wait for it: SIGTERM
            // makes it finish or roll back its open batch (its last lines still shown).
            let stop = self.on(c::unit_stop(c::BACKFILL_UNIT));
            out.say(&format!("$ {}", stop.display()));
            if let Err(e) = stop.run() {
                out.warn(&format!("{e:#}"));
            }
            stop_following(following);
            return Err(fail(
                Exit::Interrupted,
                "interrupted; the backfill stopped after its open batch and every committed \
                 batch is kept. Run `hydra-upgrade upgrade` again to continue.",
            ));
        }
        stop_following(following);
        match code? {
            Some(0) => Ok(Some(Detached {
                report: read_report_file(&report_file, out),
            })),
            Some(code) => {
                let exit = exit_from_code(code);
                // Its last lines, in case the journal passed them on after we stopped
                // showing it.
                Err(fail(
                    exit,
                    format!(
                        "the backfill in {}.service ended with exit code {code}. Committed \
                         batches are kept: run `hydra-upgrade upgrade` again to continue.{}",
                        c::BACKFILL_UNIT,
                        self.journal(c::BACKFILL_UNIT)
                    ),
                ))
            }
            None => Err(fail(
                Exit::Interrupted,
                "the backfill unit's client was stopped by a signal; the backfill may still \
                 run in its unit. Run `hydra-upgrade upgrade` again: it waits for it, then \
                 continues.",
            )),
        }
    }

    fn dry_run_commands(&self, step: &str) -> Vec<String> {
        let on = |cmd: Cmd| self.on(cmd).display();
        let sys = |phase: Phase| {
            self.system(phase)
                .map(Path::to_owned)
                .unwrap_or_else(|| PathBuf::from(format!("<{} system>", label(phase))))
        };
        let mut v = Vec::new();
        match step {
            "preflight" => {
                v.push(on(c::current_system()));
                for phase in [Phase::Migration, Phase::Final] {
                    if self.system(phase).is_some() || self.settings.hooks[idx(phase)].is_none() {
                        v.push(on(c::is_nixos_system(&sys(phase))));
                    }
                }
                v.push(on(c::unit_show(c::HYDRA_INIT, &["LoadState"])));
                v.push(on(c::unit_show("hydra-server.service", &["LoadState"])));
                if self.pending_switch().is_none() {
                    v.push(on(c::unit_show("hydra-server.service", &["ActiveState"])));
                    v.push(format!(
                        "(from here) GET {} while hydra-server is active: it must answer",
                        self.settings.hydra_url
                    ));
                }
            }
            "switch-migration" | "switch-final" => {
                let phase = if step == "switch-final" {
                    Phase::Final
                } else {
                    Phase::Migration
                };
                v.push(on(c::current_system()));
                if self.system(phase).is_some() {
                    v.push(on(c::is_nixos_system(&sys(phase))));
                }
                if let Some(h) = &self.settings.hooks[idx(phase)] {
                    v.push(c::hook(h, label(phase), self.system(phase)).display());
                } else {
                    if self.settings.mode == SwitchMode::Switch {
                        v.push(on(c::set_profile(&sys(phase))));
                    }
                    v.push(on(c::activate(
                        &sys(phase),
                        self.settings.mode,
                        label(phase),
                    )));
                }
                v.push(format!(
                    "{}   (every {} ms until it has finished, at most {}s)",
                    on(c::unit_show(
                        c::HYDRA_INIT,
                        &["ActiveState", "Result", "ExecMainStatus"]
                    )),
                    self.settings.poll.as_millis(),
                    self.settings.init_timeout.as_secs()
                ));
                for unit in c::HYDRA_UNITS {
                    v.push(on(c::unit_show(unit, &["LoadState", "ActiveState"])));
                }
                v.push(format!("GET {}", self.settings.hydra_url));
                v.push(format!("(on failure) {}", on(c::journal("hydra-init", 20))));
                let prev = PathBuf::from("<the system running before>");
                if self.settings.mode == SwitchMode::Switch {
                    v.push(format!("(on failure) {}", on(c::set_profile(&prev))));
                }
                v.push(format!(
                    "(on failure) {}",
                    on(c::activate(&prev, self.settings.mode, ROLLBACK))
                ));
            }
            "backfill" => match &self.settings.detached_backfill {
                Some(d) => v.push(
                    c::backfill_unit(
                        &self
                            .state
                            .dir()
                            .map(|d| d.join("backfill.env"))
                            .unwrap_or_else(|| PathBuf::from("<state dir>/backfill.env")),
                        &d.argv,
                    )
                    .display(),
                ),
                None => v.push("(in this process) backfill Jobs and Builds".into()),
            },
            _ => {}
        }
        v
    }
}

/// Show a local unit's journal on our stderr from now on, while we wait for the unit
/// ([`stop_following`]). Without `journalctl` the wait goes on unshown.
/// The commands that roll the host back to `previous` by hand, for error messages.
fn roll_back_by_hand(previous: &Path) -> String {
    format!(
        "`nix-env -p {} --set {prev} && {prev}/bin/switch-to-configuration switch`",
        c::SYSTEM_PROFILE,
        prev = previous.display()
    )
}

fn follow_journal(unit: &str, out: &Out) -> Option<Running> {
    match c::journal_follow(unit, std::time::SystemTime::now()).start_to_stderr() {
        Ok(running) => Some(running),
        Err(e) => {
            out.warn(&format!(
                "{e:#}; `journalctl -fu {unit}` shows its progress"
            ));
            None
        }
    }
}

/// Stop showing a unit's journal, once the journal has had a moment to pass on the unit's
/// last lines (a failure's error names them again from the journal).
fn stop_following(following: Option<Running>) {
    if following.is_some() {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The report the backfill unit wrote (`backfill --report-file`), removed once read;
/// `None`, with a warning, if it cannot be read.
fn read_report_file(path: &Path, out: &Out) -> Option<crate::backfill::Report> {
    let read = std::fs::read_to_string(path)
        .map_err(anyhow::Error::from)
        .and_then(|text| Ok(serde_json::from_str(&text)?));
    let _ = std::fs::remove_file(path);
    read.map_err(|e| {
        out.warn(&format!(
            "the backfill unit ended well, but its report {} cannot be read ({e:#}); the \
             summary lists the backfill without its figures",
            path.display()
        ))
    })
    .ok()
}

/// Write `NAME="value"` lines readable by systemd and `sh`, mode 0600.
fn write_env_file(path: &Path, env: &[(String, String)]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for (k, v) in env {
        writeln!(f, "{k}={}", c::env_file_value(v))?;
    }
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(target: Target, mode: SwitchMode) -> NixosHost {
        NixosHost::new(
            Settings {
                target,
                mode,
                systems: [
                    Some("/nix/store/m-system".into()),
                    Some("/nix/store/f-system".into()),
                ],
                hooks: [None, None],
                hydra_url: "http://hydra:3000".into(),
                init_timeout: Duration::from_secs(60),
                health_timeout: Duration::from_secs(5),
                poll: Duration::from_millis(100),
                detached_backfill: None,
            },
            StateFile::in_memory(),
            Interrupt::default(),
        )
    }

    #[test]
    fn a_switch_over_ssh_runs_every_host_command_through_ssh_in_order() {
        let h = host(Target::new(Some("root@hydra")), SwitchMode::Switch);
        let cmds = h.dry_run_commands("switch-final");
        let host_cmds: Vec<&String> = cmds.iter().filter(|c| !c.starts_with("GET ")).collect();
        for c in &host_cmds {
            assert!(
                c.trim_start_matches("(on failure) ")
                    .starts_with("ssh -o BatchMode=yes -o ServerAliveInterval=15 root@hydra -- "),
                "{c}"
            );
        }
        let joined = cmds.join("\n");
        let order = [
            "'readlink -f /run/current-system'",
            "'test -x /nix/store/f-system/bin/switch-to-configuration'",
            "'nix-env -p /nix/var/nix/profiles/system --set /nix/store/f-system'",
            "'systemd-run --wait --pipe --collect --service-type=exec --quiet --no-ask-password --unit=hydra-upgrade-switch-final -- /nix/store/f-system/bin/switch-to-configuration switch'",
            "'systemctl show -p ActiveState,Result,ExecMainStatus hydra-init.service'",
            "GET http://hydra:3000",
            "'journalctl -u hydra-init -n 20 --no-pager'",
        ];
        let mut at = 0;
        for needle in order {
            at += joined[at..]
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} missing after {at}:\n{joined}"));
        }
        // test mode: no profile change, `switch-to-configuration test`
        let t = host(Target::Local, SwitchMode::Test).dry_run_commands("switch-migration");
        assert!(!t.iter().any(|c| c.contains("nix-env")), "{t:?}");
        assert!(
            t.iter()
                .any(|c| c.ends_with("/nix/store/m-system/bin/switch-to-configuration test"))
        );
    }

    #[test]
    fn child_exit_codes_map_back() {
        assert_eq!(exit_from_code(130), Exit::Interrupted);
        assert_eq!(exit_from_code(8), Exit::Locked);
        assert_eq!(exit_from_code(99), Exit::Internal);
    }

    #[test]
    fn env_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.env");
        write_env_file(
            &p,
            &[(
                "HYDRA_DBI".into(),
                "dbi:Pg:dbname=hydra;password=a$b".into(),
            )],
        )
        .unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "HYDRA_DBI=\"dbi:Pg:dbname=hydra;password=a\\$b\"\n"
        );
    }
}
