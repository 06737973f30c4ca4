//! Every command the NixOS host layer runs, built by pure functions so that the exact
//! command lines (local and over SSH) are unit-tested, as deploy-rs does.

use std::path::Path;

use crate::cli::SwitchMode;
use crate::exec::{Cmd, shell_words};

/// The system profile `nixos-rebuild switch` sets.
pub const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";
/// The running system.
pub const CURRENT_SYSTEM: &str = "/run/current-system";
/// The oneshot unit that runs Hydra's schema upgrades.
pub const HYDRA_INIT: &str = "hydra-init.service";
/// Units that must be active for Hydra to count as healthy (when the system defines them).
pub const HYDRA_UNITS: [&str; 3] = [
    "hydra-server.service",
    "hydra-queue-runner.service",
    "hydra-evaluator.service",
];
/// The transient unit the long backfill runs in, so an SSH drop cannot stop it.
pub const BACKFILL_UNIT: &str = "hydra-upgrade-backfill";

/// Where host commands run: here, or on another machine over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local,
    /// `user@host` (anything `ssh` accepts as a destination).
    Ssh(String),
}

impl Target {
    pub fn new(target_host: Option<&str>) -> Target {
        match target_host {
            Some(h) if !h.is_empty() && h != "localhost" => Target::Ssh(h.to_owned()),
            _ => Target::Local,
        }
    }

    /// The command as it runs on the target. Over SSH the remote shell joins the words,
    /// so each one is quoted; `BatchMode` makes a missing key fail instead of prompting.
    pub fn on(&self, cmd: Cmd) -> Cmd {
        match self {
            Target::Local => cmd,
            Target::Ssh(dest) => {
                let remote = shell_words(&cmd.argv());
                Cmd::new("ssh")
                    .args(["-o", "BatchMode=yes", "-o", "ServerAliveInterval=15"])
                    .arg(dest)
                    .arg("--")
                    .arg(remote)
                    .stdin_bytes(Vec::new())
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Local => "this machine".into(),
            Target::Ssh(d) => d.clone(),
        }
    }

    /// Host name part of the destination (for the default health URL).
    pub fn hostname(&self) -> Option<&str> {
        match self {
            Target::Local => None,
            Target::Ssh(d) => Some(d.rsplit('@').next().unwrap_or(d)),
        }
    }
}

/// `readlink -f /run/current-system`: the store path of the running system.
pub fn current_system() -> Cmd {
    Cmd::new("readlink").args(["-f", CURRENT_SYSTEM])
}

/// Succeeds when `system` looks like a NixOS system toplevel.
pub fn is_nixos_system(system: &Path) -> Cmd {
    Cmd::new("test")
        .arg("-x")
        .arg(system.join("bin/switch-to-configuration"))
}

/// `nix-env -p /nix/var/nix/profiles/system --set <system>` (what `nixos-rebuild switch`
/// does before activating, so the next boot uses it too).
pub fn set_profile(system: &Path) -> Cmd {
    Cmd::new("nix-env")
        .args(["-p", SYSTEM_PROFILE, "--set"])
        .arg(system)
}

/// The transient unit name of one activation.
pub fn switch_unit(label: &str) -> String {
    format!("hydra-upgrade-switch-{label}")
}

/// `systemd-run` starting a transient service `unit` that we wait for (its exit status
/// is ours), collected when done, never asking for a password (as nixos-rebuild); with
/// `pipe` its output comes through ours, else it goes to the unit's journal.
fn transient_unit(unit: &str, pipe: bool) -> Cmd {
    Cmd::new("systemd-run")
        .arg("--wait")
        .args(pipe.then_some("--pipe"))
        .args([
            "--collect",
            "--service-type=exec",
            "--quiet",
            "--no-ask-password",
        ])
        .arg(format!("--unit={unit}"))
}

/// `<system>/bin/switch-to-configuration switch|test` under `systemd-run`, so that the
/// activation runs to its end even when our SSH session or process dies. Its output is
/// piped to ours (`--pipe`), over SSH too, as nixos-rebuild shows it.
pub fn activate(system: &Path, mode: SwitchMode, label: &str) -> Cmd {
    let action = match mode {
        SwitchMode::Switch => "switch",
        SwitchMode::Test => "test",
    };
    transient_unit(&switch_unit(label), true)
        .arg("--")
        .arg(system.join("bin/switch-to-configuration"))
        .arg(action)
        .stdin_bytes(Vec::new())
}

/// A per-phase switch hook (colmena, deploy-rs, ...), run locally with `sh -c`.
pub fn hook(command: &str, phase: &str, system: Option<&Path>) -> Cmd {
    let mut c = Cmd::new("sh")
        .args(["-c", command])
        .env("HYDRA_UPGRADE_PHASE", phase);
    if let Some(s) = system {
        c = c.env("HYDRA_UPGRADE_SYSTEM", s.as_os_str());
    }
    c
}

/// `systemctl show -p A,B,... <unit>`: `KEY=value` lines.
pub fn unit_show(unit: &str, properties: &[&str]) -> Cmd {
    Cmd::new("systemctl")
        .arg("show")
        .arg("-p")
        .arg(properties.join(","))
        .arg(unit)
}

/// `systemctl stop <unit>.service` (SIGTERM; waits until it has stopped).
pub fn unit_stop(unit: &str) -> Cmd {
    Cmd::new("systemctl")
        .arg("stop")
        .arg(format!("{unit}.service"))
}

/// The last `lines` journal lines of a unit.
pub fn journal(unit: &str, lines: u32) -> Cmd {
    Cmd::new("journalctl")
        .arg("-u")
        .arg(unit)
        .arg("-n")
        .arg(lines.to_string())
        .arg("--no-pager")
}

/// The flake attributes of both phase systems, from `--flake path#name`. The NixOS module
/// exposes each phase's toplevel as `config.system.build.hydraUpgrade.<phase>`.
pub fn flake_attrs(flake: &str) -> Option<[String; 2]> {
    let (path, name) = flake.split_once('#')?;
    if name.is_empty() {
        return None;
    }
    let base = if name.starts_with("nixosConfigurations.") {
        format!("{path}#{name}")
    } else {
        format!("{path}#nixosConfigurations.\"{name}\"")
    };
    Some(["migration", "final"].map(|p| format!("{base}.config.system.build.hydraUpgrade.{p}")))
}

/// `nix build --no-link --print-out-paths <both attrs>`: one store path per line, in order.
pub fn nix_build(attrs: &[String]) -> Cmd {
    Cmd::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-link",
            "--print-out-paths",
        ])
        .args(attrs)
}

/// Copy built systems to the target host (when building here for another machine).
pub fn nix_copy(dest: &str, paths: &[&Path]) -> Cmd {
    Cmd::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
        ])
        .arg(format!("ssh://{dest}"))
        .args(paths.iter().map(|p| p.as_os_str()))
}

/// Run `argv` (a hydra-upgrade invocation) as the transient unit `hydra-upgrade-backfill`:
/// it keeps running when the terminal or SSH session goes away. Its output goes to the
/// journal, not through our streams: with `--pipe` it would write to our terminal or pipe,
/// which an SSH drop takes away; we show it from the journal while we wait
/// ([`journal_follow`]). The database DSN reaches it through an `EnvironmentFile` (mode
/// 0600), never through a command line.
pub fn backfill_unit(env_file: &Path, argv: &[String]) -> Cmd {
    transient_unit(BACKFILL_UNIT, false)
        .arg("-p")
        .arg(format!("EnvironmentFile={}", env_file.display()))
        .arg("--")
        .args(argv)
        .stdin_bytes(Vec::new())
}

/// Follow what a unit's processes write to the journal (not systemd's own lines about
/// the unit) from `since` on, the messages only.
pub fn journal_follow(unit: &str, since: std::time::SystemTime) -> Cmd {
    let since = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Cmd::new("journalctl")
        .args(["--follow", "--quiet", "--no-pager", "--output=cat"])
        .arg(format!(
            "--since=@{}.{:06}",
            since.as_secs(),
            since.subsec_micros()
        ))
        .arg(format!("_SYSTEMD_UNIT={unit}.service"))
}

/// Parse `systemctl show` output into (key, value) pairs.
pub fn parse_show(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A value for a systemd `EnvironmentFile` that `sh` reads the same way: double quotes,
/// with `\`, `"`, `$` and backquote escaped.
pub fn env_file_value(value: &str) -> String {
    let mut s = String::from("\"");
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sys() -> PathBuf {
        PathBuf::from("/nix/store/abc-nixos-system-hydra")
    }

    #[test]
    fn local_commands_are_plain() {
        let t = Target::new(None);
        assert_eq!(
            t.on(set_profile(&sys())).display(),
            "nix-env -p /nix/var/nix/profiles/system --set /nix/store/abc-nixos-system-hydra"
        );
        assert_eq!(
            t.on(activate(&sys(), SwitchMode::Switch, "migration"))
                .display(),
            "systemd-run --wait --pipe --collect --service-type=exec --quiet \
             --no-ask-password --unit=hydra-upgrade-switch-migration -- \
             /nix/store/abc-nixos-system-hydra/bin/switch-to-configuration switch"
        );
        assert_eq!(
            activate(&sys(), SwitchMode::Test, "final")
                .argv()
                .last()
                .unwrap(),
            "test"
        );
        assert_eq!(
            t.on(current_system()).display(),
            "readlink -f /run/current-system"
        );
        assert_eq!(Target::new(Some("localhost")), Target::Local);
    }

    #[test]
    fn ssh_wraps_every_word_quoted() {
        let t = Target::new(Some("root@hydra.example.org"));
        let c = t.on(unit_show(
            HYDRA_INIT,
            &["ActiveState", "Result", "ExecMainStatus"],
        ));
        assert_eq!(
            c.argv(),
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                "-o",
                "ServerAliveInterval=15",
                "root@hydra.example.org",
                "--",
                "systemctl show -p ActiveState,Result,ExecMainStatus hydra-init.service"
            ]
        );
        let c = t.on(Cmd::new("echo").arg("it's a $HOME"));
        assert_eq!(c.argv().last().unwrap(), r#"echo 'it'\''s a $HOME'"#);
        let c = t.on(activate(&sys(), SwitchMode::Switch, "final"));
        assert!(c.argv().last().unwrap().starts_with("systemd-run --wait"));
        assert_eq!(t.hostname(), Some("hydra.example.org"));
        assert_eq!(
            t.on(journal("hydra-init", 20)).argv().last().unwrap(),
            "journalctl -u hydra-init -n 20 --no-pager"
        );
    }

    #[test]
    fn flake_reference_names_both_phase_toplevels() {
        let [m, f] = flake_attrs(".#hydra").unwrap();
        assert_eq!(
            m,
            ".#nixosConfigurations.\"hydra\".config.system.build.hydraUpgrade.migration"
        );
        assert!(f.ends_with("hydraUpgrade.final"));
        let [m, _] = flake_attrs("github:me/infra#nixosConfigurations.ci").unwrap();
        assert_eq!(
            m,
            "github:me/infra#nixosConfigurations.ci.config.system.build.hydraUpgrade.migration"
        );
        assert!(flake_attrs(".").is_none());
        assert!(flake_attrs(".#").is_none());
        let c = nix_build(std::slice::from_ref(&m));
        assert_eq!(c.argv()[3..6], ["build", "--no-link", "--print-out-paths"]);
        let c = nix_copy("root@h", &[sys().as_path()]);
        assert!(
            c.display()
                .ends_with("copy --to ssh://root@h /nix/store/abc-nixos-system-hydra")
        );
    }

    #[test]
    fn hooks_run_with_sh_and_name_the_phase() {
        let c = hook("colmena apply --on hydra", "migration", Some(&sys()));
        assert_eq!(
            c.display(),
            "HYDRA_UPGRADE_PHASE=… HYDRA_UPGRADE_SYSTEM=… sh -c 'colmena apply --on hydra'"
        );
    }

    #[test]
    fn backfill_unit_keeps_the_dsn_off_the_command_line() {
        let c = backfill_unit(
            Path::new("/var/lib/hydra-upgrade/backfill.env"),
            &["/bin/hydra-upgrade".into(), "backfill".into()],
        );
        let d = c.display();
        assert!(d.contains("--unit=hydra-upgrade-backfill"), "{d}");
        assert!(
            d.contains("-p EnvironmentFile=/var/lib/hydra-upgrade/backfill.env"),
            "{d}"
        );
        assert!(d.ends_with("-- /bin/hydra-upgrade backfill"), "{d}");
        // Its output goes to the journal, not to our streams, which an SSH drop takes away.
        assert!(!d.contains("--pipe"), "{d}");
    }

    #[test]
    fn the_journal_follower_reads_the_units_own_lines_from_a_moment_on() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_000_123);
        assert_eq!(
            journal_follow(BACKFILL_UNIT, at).display(),
            "journalctl --follow --quiet --no-pager --output=cat --since=@1700000000.000123 \
             _SYSTEMD_UNIT=hydra-upgrade-backfill.service"
        );
    }

    #[test]
    fn show_output_and_env_values_parse() {
        let kv = parse_show("ActiveState=failed\nResult=exit-code\nExecMainStatus=1\n");
        assert_eq!(kv[1], ("Result".into(), "exit-code".into()));
        assert_eq!(env_file_value(r#"a"b$c\d"#), r#""a\"b\$c\\d""#);
    }
}
