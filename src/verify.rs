//! Prove there is nothing left: exact counts, per table, of NULL jobset_id rows that can
//! still be filled, orphans (NULL rows whose project/jobset matches no jobset) and wrong
//! values (jobset_id not the id of the row's own jobset), with up to ten sample keys each.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backfill::Table;
use crate::db::Db;

const SAMPLES: i64 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct TableCheck {
    pub table: Table,
    pub null_rows: i64,
    pub orphans: i64,
    pub wrong: i64,
    pub null_samples: Vec<String>,
    pub orphan_samples: Vec<String>,
    pub wrong_samples: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub clean: bool,
    pub tables: Vec<TableCheck>,
    /// Tables that no longer exist (Hydra's schema 67 drops Jobs): nothing to check.
    pub dropped: Vec<Table>,
}

/// A readable key of a row, per table.
fn key_expr(table: Table) -> &'static str {
    match table {
        Table::Jobs => "t.project || ':' || t.jobset || ':' || t.name",
        Table::Builds => "'build ' || t.id || ' (' || t.project || ':' || t.jobset || ')'",
    }
}

const JOIN: &str = "LEFT JOIN jobsets js ON js.project = t.project AND js.name = t.jobset";
const IS_NULL: &str = "t.jobset_id IS NULL AND js.id IS NOT NULL";
const IS_ORPHAN: &str = "t.jobset_id IS NULL AND js.id IS NULL";
const IS_WRONG: &str = "t.jobset_id IS NOT NULL AND t.jobset_id IS DISTINCT FROM js.id";

/// The three kinds of row `verify` counts, in the order of [`TableCheck`]'s fields.
const KINDS: [&str; 3] = [IS_NULL, IS_ORPHAN, IS_WRONG];

/// How many sample rows the portal hands over per fetch.
const SAMPLE_FETCH: i32 = 100;

/// Count one table's rows of each kind and take up to [`SAMPLES`] keys of each, in one
/// read-only snapshot (so the samples agree with the counts however Hydra writes
/// meanwhile). The samples of every kind found come from one more scan, read through a
/// portal a hundred rows at a time and closed as soon as each kind has its samples: at
/// most two reads of the table, where a query per kind read all of it again for each
/// kind with fewer than ten rows (the usual few stragglers or orphans).
fn check_table(db: &mut Db, table: Table) -> Result<TableCheck> {
    let t = table.name();
    let mut tx = db
        .client()
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let counts_sql = format!(
        "SELECT count(*) FILTER (WHERE {IS_NULL}), count(*) FILTER (WHERE {IS_ORPHAN}),
                count(*) FILTER (WHERE {IS_WRONG})
           FROM {t} AS t {JOIN}"
    );
    let row = tx.query_one(&counts_sql, &[])?;
    let counts: [i64; 3] = [row.get(0), row.get(1), row.get(2)];
    let wanted = counts.map(|n| n.min(SAMPLES) as usize);
    let mut samples: [Vec<String>; 3] = Default::default();
    let present: Vec<&str> = KINDS
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(kind, _)| *kind)
        .collect();
    if !present.is_empty() {
        let sql = format!(
            "SELECT CASE WHEN {IS_NULL} THEN 0 WHEN {IS_ORPHAN} THEN 1 ELSE 2 END, {key}
               FROM {t} AS t {JOIN} WHERE ({kinds})",
            key = key_expr(table),
            kinds = present.join(") OR (")
        );
        let statement = tx.prepare(&sql)?;
        let portal = tx.bind(&statement, &[])?;
        loop {
            let rows = tx.query_portal(&portal, SAMPLE_FETCH)?;
            for r in &rows {
                let kind = r.get::<_, i32>(0) as usize;
                if samples[kind].len() < wanted[kind] {
                    samples[kind].push(r.get(1));
                }
            }
            let complete = (0..3).all(|k| samples[k].len() >= wanted[k]);
            if complete || rows.len() < SAMPLE_FETCH as usize {
                break;
            }
        }
    }
    tx.commit()?;
    let [null_samples, orphan_samples, wrong_samples] = samples;
    Ok(TableCheck {
        table,
        null_rows: counts[0],
        orphans: counts[1],
        wrong: counts[2],
        null_samples,
        orphan_samples,
        wrong_samples,
    })
}

pub fn run(db: &mut Db) -> Result<Verification> {
    let mut tables = Vec::new();
    let mut dropped = Vec::new();
    for table in Table::ALL {
        if !crate::db::relation_exists(db.client(), table.name())? {
            dropped.push(table);
            continue;
        }
        tables.push(
            check_table(db, table)
                .with_context(|| format!("checking jobset_id in {}", table.name()))?,
        );
    }
    let clean = tables
        .iter()
        .all(|t| t.null_rows == 0 && t.orphans == 0 && t.wrong == 0);
    Ok(Verification {
        clean,
        tables,
        dropped,
    })
}

impl Verification {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for t in &self.dropped {
            out.push_str(&format!(
                "{}: dropped by a later Hydra schema, nothing to check\n",
                t.name()
            ));
        }
        for t in &self.tables {
            let name = t.table.name();
            out.push_str(&format!(
                "{name}: {} NULL rows to fill, {} orphan rows, {} wrong values\n",
                t.null_rows, t.orphans, t.wrong
            ));
            for (what, list) in [
                ("NULL", &t.null_samples),
                ("orphan", &t.orphan_samples),
                ("wrong", &t.wrong_samples),
            ] {
                if !list.is_empty() {
                    out.push_str(&format!("  {what} samples: {}\n", list.join(", ")));
                }
            }
        }
        out.push_str(if self.clean {
            "verify: clean, no row is left: the final phase may proceed.\n"
        } else {
            "verify: NOT clean. NULL rows: run `hydra-upgrade backfill` again (and make sure no \
             older Hydra evaluator still runs: it writes NULL rows). Orphans: delete those rows \
             or create the jobsets they name. Wrong values: report a bug. The final phase is \
             refused until verify is clean.\n"
        });
        out
    }

    /// One line naming what is left, for error messages.
    pub fn summary(&self) -> String {
        self.tables
            .iter()
            .filter(|t| t.null_rows + t.orphans + t.wrong > 0)
            .map(|t| {
                let first = t
                    .null_samples
                    .iter()
                    .chain(&t.orphan_samples)
                    .chain(&t.wrong_samples)
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "{}: {} NULL, {} orphan, {} wrong (e.g. {first})",
                    t.table.name(),
                    t.null_rows,
                    t.orphans,
                    t.wrong
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}
