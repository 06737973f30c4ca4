//! Where the database is: a libpq URL or keyword string, or Hydra's Perl DBI string,
//! turned into a `postgres::Config`. Passwords come from the DSN, `PGPASSWORD` or the
//! pgpass file and are never printed: [`Dsn::describe`] is the only way to show a DSN.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Result;
use postgres::config::Host;

use crate::exit::{Exit, fail};

/// Hosts tried, in order, when the DSN names none: NixOS first.
const SOCKET_DIRS: [&str; 3] = ["/run/postgresql", "/var/run/postgresql", "/tmp"];

#[derive(Clone)]
pub struct Dsn {
    pub config: postgres::Config,
}

impl std::fmt::Debug for Dsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Dsn {
    /// Parse any of the three forms, then fill what libpq would fill from the
    /// environment (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD, PGPASSFILE).
    pub fn parse(text: &str) -> Result<Dsn> {
        let text = text.trim();
        let mut config = if let Some(rest) = strip_prefix_ci(text, "dbi:") {
            parse_dbi(rest)?
        } else {
            postgres::Config::from_str(text).map_err(|e| {
                fail(
                    Exit::Config,
                    format!(
                        "cannot parse the database DSN ({}); give a libpq URL \
                         (postgresql://user@host/db), a keyword string (host=... dbname=...), \
                         or Hydra's DBI string (dbi:Pg:dbname=hydra;user=hydra;)",
                        crate::db::error_text(&e)
                    ),
                )
            })?
        };
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(fail(
                Exit::Config,
                "sslmode=require: hydra-upgrade connects without TLS (it has no TLS \
                 implementation). Connect over the Unix socket of the database host (as \
                 Hydra's own dbi on NixOS does) or over a trusted network with sslmode=disable \
                 or prefer.",
            ));
        }
        fill_defaults(&mut config);
        config.application_name("hydra-upgrade");
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        Ok(Dsn { config })
    }

    /// The host as libpq tools take it (`-h`): a name, an address or a socket directory.
    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    /// A description safe to print: never the password.
    pub fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "dbname={} user={} host={} port={}",
            c.get_dbname().unwrap_or(""),
            c.get_user().unwrap_or(""),
            self.host(),
            self.port()
        )
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// `Pg:dbname=hydra;user=hydra;host=...;port=...` (after `dbi:`), as DBD::Pg reads it.
fn parse_dbi(rest: &str) -> Result<postgres::Config> {
    let malformed = |why: String| {
        fail(
            Exit::Config,
            format!(
                "malformed DBI string: {why}; expected dbi:Pg:dbname=NAME;user=USER;host=HOST;port=PORT"
            ),
        )
    };
    let Some(params) = strip_prefix_ci(rest, "Pg:") else {
        let driver = rest.split(':').next().unwrap_or("");
        return Err(malformed(format!(
            "driver {driver:?} is not Pg (Hydra only runs on PostgreSQL)"
        )));
    };
    let mut config = postgres::Config::new();
    for (n, part) in params.split(';').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            // Not echoed: it may be the end of a password that contains a ';'.
            return Err(malformed(format!(
                "part {} (counting from 1 between ';') has no '='",
                n + 1
            )));
        };
        let value = value.trim();
        match key.trim().to_ascii_lowercase().as_str() {
            "dbname" | "database" | "db" => {
                config.dbname(value);
            }
            "host" => {
                add_host(&mut config, value);
            }
            "port" => {
                let port = value
                    .parse::<u16>()
                    .map_err(|_| malformed(format!("port {value:?} is not a number")))?;
                config.port(port);
            }
            "user" | "username" => {
                config.user(value);
            }
            "password" => {
                config.password(value);
            }
            "options" => {
                config.options(value);
            }
            "sslmode" => {
                let mode = match value {
                    "disable" => postgres::config::SslMode::Disable,
                    "prefer" | "allow" => postgres::config::SslMode::Prefer,
                    "require" => postgres::config::SslMode::Require,
                    other => return Err(malformed(format!("sslmode {other:?} is not supported"))),
                };
                config.ssl_mode(mode);
            }
            "application_name" | "connect_timeout" => {}
            other => return Err(malformed(format!("unknown key {other:?}"))),
        }
    }
    Ok(config)
}

fn add_host(config: &mut postgres::Config, host: &str) {
    if host.starts_with('/') {
        config.host_path(host);
    } else {
        config.host(host);
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn fill_defaults(config: &mut postgres::Config) {
    if config.get_ports().is_empty()
        && let Some(port) = env("PGPORT").and_then(|p| p.parse().ok())
    {
        config.port(port);
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    if config.get_hosts().is_empty() {
        match env("PGHOST") {
            Some(h) => add_host(config, &h),
            None => {
                let socket = SOCKET_DIRS
                    .iter()
                    .find(|d| Path::new(d).join(format!(".s.PGSQL.{port}")).exists());
                match socket {
                    Some(dir) => add_host(config, dir),
                    None => add_host(config, "localhost"),
                }
            }
        }
    }
    if config.get_user().is_none() {
        let user = env("PGUSER")
            .or_else(|| env("USER"))
            .unwrap_or_else(|| "hydra".into());
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        let db = env("PGDATABASE").unwrap_or_else(|| config.get_user().unwrap_or("").to_owned());
        config.dbname(&db);
    }
    if config.get_password().is_none() {
        if let Some(pw) = env("PGPASSWORD") {
            config.password(pw);
        } else if let Some(pw) = pgpass_lookup(config, port) {
            config.password(pw);
        }
    }
}

/// The pgpass file libpq would read: `$PGPASSFILE`, else `~/.pgpass`.
pub fn pgpass_path() -> Option<PathBuf> {
    env("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))
}

fn pgpass_lookup(config: &postgres::Config, port: u16) -> Option<String> {
    let text = std::fs::read_to_string(pgpass_path()?).ok()?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(h) => h.clone(),
        // libpq matches a Unix socket against "localhost".
        Host::Unix(_) => "localhost".into(),
    };
    let want = [
        host,
        port.to_string(),
        config.get_dbname()?.to_owned(),
        config.get_user()?.to_owned(),
    ];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = fields[..4]
                .iter()
                .zip(&want)
                .all(|(f, w)| f == "*" || f == w);
            matches.then(|| fields[4].clone())
        })
}

/// Split a pgpass line on unescaped ':' and undo `\:` and `\\`.
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hydra_default_dbi() {
        let d = Dsn::parse("dbi:Pg:dbname=hydra;user=hydra;").unwrap();
        assert_eq!(d.config.get_dbname(), Some("hydra"));
        assert_eq!(d.config.get_user(), Some("hydra"));
        assert_eq!(d.config.get_application_name(), Some("hydra-upgrade"));
    }

    #[test]
    fn dbi_with_host_port_password_is_never_described() {
        let d =
            Dsn::parse("dbi:Pg:dbname=h;user=u;host=/run/pg;port=5433;password=s3cret").unwrap();
        let text = d.describe();
        assert_eq!(text, "dbname=h user=u host=/run/pg port=5433");
        assert!(!format!("{d:?}").contains("s3cret"));
    }

    #[test]
    fn malformed_dbi_is_a_config_error() {
        for bad in [
            "dbi:mysql:dbname=x",
            "dbi:Pg:dbname",
            "dbi:Pg:port=abc",
            "dbi:Pg:frob=1",
        ] {
            let err = Dsn::parse(bad).unwrap_err();
            assert_eq!(crate::exit::exit_of(&err), Exit::Config, "{bad}");
        }
    }

    #[test]
    fn a_malformed_dbi_part_is_not_echoed() {
        // A password with a ';' splits into a part without '='.
        let err = Dsn::parse("dbi:Pg:dbname=h;password=Sup3r;SecretPw").unwrap_err();
        let text = format!("{err:#}");
        assert!(!text.contains("SecretPw"), "{text}");
        assert!(text.contains("part 3"), "{text}");
    }

    #[test]
    fn a_malformed_dsn_says_which_option_is_wrong() {
        let err = Dsn::parse("host=/tmp frob=1").unwrap_err();
        assert_eq!(crate::exit::exit_of(&err), Exit::Config);
        assert!(format!("{err:#}").contains("frob"), "{err:#}");
        // The reason names options, never their values.
        for bad in [
            "postgresql://u:s3cret@db:notaport/h",
            "postgresql://u:s3cret@db/h?frob=1",
            "host=db password=s3cret port=x",
            "host=db password='s3cret",
            "host=db password=s3cret sslmode=verify-full",
        ] {
            let err = Dsn::parse(bad).unwrap_err();
            assert!(!format!("{err:#}").contains("s3cret"), "{bad}: {err:#}");
        }
    }

    #[test]
    fn sslmode_require_is_refused_as_unsupported() {
        for dsn in [
            "dbi:Pg:dbname=h;host=db;sslmode=require",
            "postgresql://u@db/h?sslmode=require",
            "host=db dbname=h sslmode=require",
        ] {
            let err = Dsn::parse(dsn).unwrap_err();
            assert_eq!(crate::exit::exit_of(&err), Exit::Config, "{dsn}");
            assert!(format!("{err:#}").contains("without TLS"), "{err:#}");
        }
        assert!(Dsn::parse("host=db dbname=h sslmode=prefer").is_ok());
    }

    #[test]
    fn url_and_keywords() {
        let d = Dsn::parse("postgresql://alice@db.example:6543/hydra").unwrap();
        assert_eq!(
            d.describe(),
            "dbname=hydra user=alice host=db.example port=6543"
        );
        let d = Dsn::parse("host=/tmp dbname=x user=y").unwrap();
        assert_eq!(d.describe(), "dbname=x user=y host=/tmp port=5432");
    }

    #[test]
    fn pgpass_escapes() {
        assert_eq!(
            split_pgpass(r"h:5432:d:u:p\:w\\d"),
            ["h", "5432", "d", "u", r"p:w\d"]
        );
    }
}
