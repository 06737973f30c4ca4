//! How the tool talks while it works: a progress bar on a terminal, one plain line per
//! interval elsewhere (systemd journal, pipes), or JSON lines with `--json`.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// Write to stdout, ignoring a failure. Everything the tool prints goes through here or
/// [`write_err`] ([`crate::outln!`], [`crate::errln!`]): `println!` panics when its stream
/// has gone away (a dropped SSH session's terminal answers EIO, a pipe whose reader
/// exited EPIPE), and a backfill must not end because nobody is watching it.
pub fn write_out(args: fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.flush());
}

/// Text that ends its own lines, on stdout ([`write_out`]).
pub fn print_text(text: &str) {
    write_out(format_args!("{text}"));
}

/// [`write_out`] for stderr.
pub fn write_err(args: fmt::Arguments) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` that never panics ([`write_out`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::progress::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics ([`write_err`]).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::progress::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bar,
    Lines,
    Json,
}

/// Event output for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub mode: Mode,
    pub line_interval: Duration,
}

impl Out {
    pub fn new(json: bool) -> Out {
        let mode = if json {
            Mode::Json
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines
        };
        Out {
            mode,
            line_interval: Duration::from_secs(10),
        }
    }

    /// A step or a notice: a line on stderr, or a JSON event on stdout.
    pub fn event(&self, kind: &str, message: &str, data: Value) {
        if self.mode == Mode::Json {
            let mut doc = json!({"event": kind, "message": message});
            if let (Some(obj), Value::Object(extra)) = (doc.as_object_mut(), data) {
                obj.extend(extra);
            }
            crate::outln!("{doc}");
        } else {
            crate::errln!("{message}");
        }
    }

    pub fn say(&self, message: &str) {
        self.event("info", message, Value::Null);
    }

    pub fn warn(&self, message: &str) {
        self.event("warning", &format!("warning: {message}"), Value::Null);
    }

    pub fn progress(&self, label: &str, total: u64, unit: &'static str) -> Progress {
        let bar = (self.mode == Mode::Bar).then(|| {
            let bar = ProgressBar::new(total.max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>7} [{bar:30}] {percent:>3}% {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_owned());
            bar
        });
        Progress {
            out: *self,
            label: label.to_owned(),
            unit,
            total,
            pos: 0,
            rows: 0,
            start: Instant::now(),
            last_line: Instant::now(),
            bar,
        }
    }
}

/// Progress of one table's walk: position in `unit`s (pages or keys) out of `total`,
/// plus rows actually updated.
pub struct Progress {
    out: Out,
    label: String,
    unit: &'static str,
    total: u64,
    pos: u64,
    rows: u64,
    start: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.start.elapsed().as_secs_f64().max(1e-3)
    }

    fn eta(&self) -> Option<Duration> {
        let elapsed = self.start.elapsed().as_secs_f64();
        (self.pos > 0 && self.pos < self.total).then(|| {
            Duration::from_secs_f64(elapsed * (self.total - self.pos) as f64 / self.pos as f64)
        })
    }

    pub fn update(&mut self, pos: u64, rows: u64, note: &str) {
        self.pos = pos.min(self.total);
        self.rows = rows;
        let rate = self.rate();
        if let Some(bar) = &self.bar {
            bar.set_position(self.pos);
            bar.set_message(format!("{rows} rows, {rate:.0} rows/s{note}"));
            return;
        }
        if self.last_line.elapsed() < self.out.line_interval {
            return;
        }
        self.last_line = Instant::now();
        self.emit("progress", note);
    }

    fn emit(&self, kind: &str, note: &str) {
        let pct = 100.0 * self.pos as f64 / self.total.max(1) as f64;
        let eta = self
            .eta()
            .map(|d| format!("{}s", d.as_secs()))
            .unwrap_or_else(|| "-".into());
        let line = format!(
            "{}: {}/{} {} ({pct:.1}%), {} rows updated, {:.0} rows/s, ETA {eta}{note}",
            self.label,
            self.pos,
            self.total,
            self.unit,
            self.rows,
            self.rate()
        );
        self.out.event(
            kind,
            &line,
            json!({
                "table": self.label, "position": self.pos, "total": self.total,
                "unit": self.unit, "rows_updated": self.rows, "rows_per_second": self.rate(),
                "eta_seconds": self.eta().map(|d| d.as_secs()),
            }),
        );
    }

    pub fn finish(self, note: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.emit("table_done", note);
    }
}
