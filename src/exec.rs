//! The one place that runs external commands (through `duct`). A failure names the
//! command line, the exit status and the end of stderr. Environment values are never
//! shown (they may carry PGPASSWORD); only their names are.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(String, OsString)>,
    dir: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

/// Quote one word for a POSIX shell (shown to the admin, or run by a shell: over SSH,
/// by a watcher script).
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@,+%".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Words quoted for a POSIX shell ([`shell_quote`]) and joined with spaces: a command
/// line a shell runs as those words.
pub fn shell_words<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Cmd {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            dir: None,
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Cmd {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, name: &str, value: impl Into<OsString>) -> Cmd {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.dir = Some(dir.into());
        self
    }

    pub fn stdin_bytes(mut self, input: Vec<u8>) -> Cmd {
        self.stdin = Some(input);
        self
    }

    /// Prefix the command with another (`runuser -u postgres --`, `ssh host`, ...).
    pub fn wrapped(self, prefix: &[&str]) -> Cmd {
        let Some((first, rest)) = prefix.split_first() else {
            return self;
        };
        let mut args: Vec<OsString> = rest.iter().map(OsString::from).collect();
        args.push(self.program);
        args.extend(self.args);
        Cmd {
            program: first.into(),
            args,
            ..self
        }
    }

    pub fn argv(&self) -> Vec<String> {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The command line as a shell would take it; environment by name only.
    pub fn display(&self) -> String {
        let env = self
            .env
            .iter()
            .map(|(k, _)| format!("{k}=…"))
            .collect::<Vec<_>>();
        env.into_iter()
            .chain([shell_words(&self.argv())])
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn expression(&self) -> duct::Expression {
        let mut e = duct::cmd(&self.program, &self.args);
        for (k, v) in &self.env {
            e = e.env(k, v);
        }
        if let Some(d) = &self.dir {
            e = e.dir(d);
        }
        if let Some(input) = &self.stdin {
            e = e.stdin_bytes(input.clone());
        }
        e
    }

    /// Run to the end, capturing both streams; non-zero exit is an error.
    pub fn run(&self) -> Result<Output> {
        let out = self
            .expression()
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            anyhow::bail!(
                "`{}` failed ({}){}",
                self.display(),
                describe_status(out.status),
                tail(&stderr)
            );
        }
        Ok(Output { stdout, stderr })
    }

    /// Run to the end (long activations), its output going to our stderr: both its
    /// streams, so that our stdout carries only the tool's own (one JSON stream with
    /// `--json`); an activation prints to stdout. A non-zero exit is an error.
    pub fn run_inherit(&self) -> Result<()> {
        let status = self
            .expression()
            .stdout_to_stderr()
            .unchecked()
            .run()
            .with_context(|| format!("cannot start `{}`", self.display()))?
            .status;
        if !status.success() {
            anyhow::bail!("`{}` failed ({})", self.display(), describe_status(status));
        }
        Ok(())
    }

    /// Start in the background, its stdout going to our stderr (so that ours stays one JSON
    /// stream with `--json`), until the [`Running`] is dropped or we end, however we end:
    /// killed with us, it never lives on writing to the terminal. In a process group of
    /// its own, so that the terminal's Ctrl-C reaches only us, and we decide what it ends.
    pub fn start_to_stderr(&self) -> Result<Running> {
        let parent = std::process::id();
        let handle = self
            .expression()
            .stdin_null()
            .stdout_to_stderr()
            .unchecked()
            .before_spawn(move |command| {
                command.process_group(0);
                // SAFETY: the hook runs in the child between fork and exec, where only
                // async-signal-safe calls are allowed: prctl, getppid and _exit are plain
                // system calls. The death signal follows the thread that spawned the
                // child: the tool's main thread, which lives as long as the process.
                unsafe {
                    command.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // We may have died between the fork and the prctl.
                        if u32::try_from(libc::getppid()) != Ok(parent) {
                            libc::_exit(1);
                        }
                        Ok(())
                    });
                }
                Ok(())
            })
            .start()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        Ok(Running(handle))
    }

    /// Start in the background with no streams attached, and do not wait for it.
    pub fn spawn_detached(&self) -> Result<()> {
        self.expression()
            .stdin_null()
            .stdout_null()
            .stderr_null()
            .unchecked()
            .start()
            .with_context(|| format!("cannot start `{}`", self.display()))?;
        Ok(())
    }
}

/// A command started by [`Cmd::start_to_stderr`]; dropped, it is killed (if it still
/// runs) and reaped.
pub struct Running(duct::Handle);

impl Running {
    /// Its exit code once it has ended (`Some(None)`: a signal ended it).
    pub fn try_code(&self) -> Result<Option<Option<i32>>> {
        Ok(self.0.try_wait()?.map(|o| o.status.code()))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The last lines of stderr, for error messages.
fn tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(15);
    format!("; stderr:\n{}", lines[start..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_status_and_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .run()
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("`sh -c 'echo boom >&2; exit 3'`"), "{text}");
        assert!(text.contains("exit status 3"), "{text}");
        assert!(text.contains("boom"), "{text}");
    }

    #[test]
    fn env_values_are_not_displayed() {
        let c = Cmd::new("pg_dump").env("PGPASSWORD", "hunter2").arg("-Fc");
        assert_eq!(c.display(), "PGPASSWORD=… pg_dump -Fc");
    }

    #[test]
    fn wrapping_prefixes_the_command() {
        let c = Cmd::new("initdb")
            .arg("-D")
            .arg("/x")
            .wrapped(&["runuser", "-u", "postgres", "--"]);
        assert_eq!(
            c.argv(),
            ["runuser", "-u", "postgres", "--", "initdb", "-D", "/x"]
        );
    }
}
