//! A tiny blocking HTTP/1.0 GET over `std::net::TcpStream`, enough to ask whether
//! `hydra-server` answers. Plain `http://` only (Hydra listens on localhost:3000).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Split `http://host[:port][/path]` into (host, port, path).
pub fn parse_url(url: &str) -> Result<(String, u16, String)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!(
            "only http:// URLs can be checked (got {url}); Hydra itself listens on http://localhost:3000"
        )
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h,
            p.parse::<u16>()
                .with_context(|| format!("bad port in {url}"))?,
        ),
        _ => (authority, 80),
    };
    if host.is_empty() {
        bail!("no host in {url}");
    }
    Ok((
        host.trim_matches(['[', ']']).to_owned(),
        port,
        path.to_owned(),
    ))
}

/// GET the URL and return the HTTP status code.
pub fn get_status(url: &str, timeout: Duration) -> Result<u16> {
    let (host, port, path) = parse_url(url)?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {url}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json, text/html\r\nUser-Agent: hydra-upgrade\r\n\r\n"
    );
    // A server may answer and close before reading all of it: read the answer anyway.
    let _ = s.write_all(request.as_bytes());
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("reading from {url}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&String::from_utf8_lossy(&head))
        .with_context(|| format!("{url} did not answer with HTTP"))
}

fn parse_status(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|w| w.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("http://localhost:3000").unwrap(),
            ("localhost".into(), 3000, "/".into())
        );
        assert_eq!(
            parse_url("http://hydra.example.org/api/x").unwrap(),
            ("hydra.example.org".into(), 80, "/api/x".into())
        );
        assert!(parse_url("https://x").is_err());
        assert_eq!(parse_status("HTTP/1.1 302 Found\r\n"), Some(302));
        assert_eq!(parse_status("SSH-2.0-OpenSSH"), None);
    }

    #[test]
    fn gets_a_status_from_a_real_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8; 1024];
            let _ = c.read(&mut b);
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let code =
            get_status(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5)).unwrap();
        assert_eq!(code, 200);
        t.join().unwrap();
    }
}
