//! How much WAL a backfill contender writes (the cluster's WAL insert position before and
//! after it: autovacuum's WAL meanwhile included), and with `--wal-stats` what our
//! per-page backfill's WAL consists of: `pg_waldump --stats` over its range, by resource
//! manager (Heap, Btree, Gin, ...), record bytes and full-page images apart. Every commit
//! of Hydra's must flush what was written before it, so this is the write load the
//! writer's fsyncs share the disk with.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::mb;
use crate::db::Db;
use crate::pg_cluster::PgCluster;

/// The WAL insert position, in bytes.
pub fn position(db: &mut Db) -> Result<i64> {
    Ok(db
        .client()
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )?
        .get(0))
}

/// One resource manager's share of a range of WAL.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct WalKind {
    pub kind: String,
    pub records: i64,
    pub record_bytes: i64,
    pub fpi_bytes: i64,
    pub bytes: i64,
}

fn lsn(pos: i64) -> String {
    format!("{:X}/{:X}", pos >> 32, pos & 0xFFFF_FFFF)
}

/// `pg_waldump --stats` over `[start, end)`, once the server has flushed it (an
/// asynchronously committed backfill's last WAL reaches the disk within a few WAL writer
/// rounds). Needs `pg_waldump` next to `postgres`, and no checkpoint since `start`.
pub fn breakdown(cluster: &PgCluster, db: &mut Db, start: i64, end: i64) -> Result<Vec<WalKind>> {
    let t0 = Instant::now();
    loop {
        let flushed: i64 = db
            .client()
            .query_one(
                "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint",
                &[],
            )?
            .get(0);
        if flushed >= end {
            break;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!(
                "the server did not flush its WAL up to {} within 10 s",
                lsn(end)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cluster
        .tool("pg_waldump")
        .arg("-p")
        .arg(cluster.wal_dir())
        .args(["-s", &lsn(start), "-e", &lsn(end), "--stats"])
        .run()
        .context("--wal-stats needs pg_waldump next to the server's postgres binary")?;
    let kinds = parse_stats(&out.stdout);
    if kinds.is_empty() {
        bail!("no statistics in pg_waldump's output:\n{}", out.stdout);
    }
    Ok(kinds)
}

/// The rows of `pg_waldump --stats` with WAL in them: name, then count, record size,
/// full-page image size and combined size, each followed by its share in parentheses.
fn parse_stats(text: &str) -> Vec<WalKind> {
    let mut kinds = Vec::new();
    for line in text.lines() {
        // Drop the "( 12.34)" shares; the Total line's "[34.76%]" makes it fail below.
        let mut plain = String::new();
        let mut depth = 0;
        for ch in line.chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => plain.push(ch),
                _ => {}
            }
        }
        let fields: Vec<&str> = plain.split_whitespace().collect();
        let [kind, rest @ ..] = fields.as_slice() else {
            continue;
        };
        let numbers: Vec<i64> = rest.iter().filter_map(|f| f.parse().ok()).collect();
        if let [records, record_bytes, fpi_bytes, bytes] = numbers[..]
            && rest.len() == 4
            && bytes > 0
        {
            kinds.push(WalKind {
                kind: kind.to_string(),
                records,
                record_bytes,
                fpi_bytes,
                bytes,
            });
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.bytes));
    kinds
}

/// "Heap 112.6 MB (full-page images 77.2), Btree 77.5 (65.8), ...; full-page images 65 %
/// of 254.6 MB"
pub fn summary(kinds: &[WalKind]) -> String {
    let total: i64 = kinds.iter().map(|k| k.bytes).sum();
    let fpi: i64 = kinds.iter().map(|k| k.fpi_bytes).sum();
    let parts: Vec<String> = kinds
        .iter()
        .filter(|k| k.bytes * 100 >= total)
        .enumerate()
        .map(|(i, k)| {
            if i == 0 {
                format!(
                    "{} {:.1} MB (full-page images {:.1})",
                    k.kind,
                    mb(k.bytes),
                    mb(k.fpi_bytes)
                )
            } else {
                format!("{} {:.1} ({:.1})", k.kind, mb(k.bytes), mb(k.fpi_bytes))
            }
        })
        .collect();
    format!(
        "{}; full-page images {:.0} % of {:.1} MB",
        parts.join(", "),
        100.0 * fpi as f64 / total.max(1) as f64,
        mb(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pg_waldump_stats() {
        let text = "\
WAL statistics between 0/43598DD0 and 0/52B4BFC8:
Type                                           N      (%)          Record size      (%)             FPI size      (%)        Combined size      (%)
----                                           -      ---          -----------      ---             --------      ---        -------------      ---
XLOG                                           2 (  0.00)                   98 (  0.00)                  176 (  0.00)                  274 (  0.00)
CLOG                                           0 (  0.00)                    0 (  0.00)                    0 (  0.00)                    0 (  0.00)
Heap2                                     301046 ( 33.33)             17481141 ( 19.75)                85896 (  0.05)             17567037 (  6.90)
Heap                                      417400 ( 46.21)             35341209 ( 39.94)             77234976 ( 46.50)            112576185 ( 44.22)
Btree                                     139983 ( 15.50)             11744485 ( 13.27)             65791688 ( 39.61)             77536173 (100.00)
                                        --------                      --------                      --------                      --------
Total                                     903356                      88493443 [34.76%]            166097702 [65.24%]            254591145 [100%]
";
        let kinds = parse_stats(text);
        let names: Vec<&str> = kinds.iter().map(|k| k.kind.as_str()).collect();
        assert_eq!(names, ["Heap", "Btree", "Heap2", "XLOG"]);
        assert_eq!(
            kinds[0],
            WalKind {
                kind: "Heap".into(),
                records: 417400,
                record_bytes: 35341209,
                fpi_bytes: 77234976,
                bytes: 112576185,
            }
        );
        assert_eq!(
            summary(&kinds),
            "Heap 107.4 MB (full-page images 73.7), Btree 73.9 (62.7), Heap2 16.8 (0.1); \
             full-page images 69 % of 198.1 MB"
        );
    }
}
