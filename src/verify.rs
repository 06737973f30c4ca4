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

fn samples(db: &mut Db, table: Table, condition: &str, count: i64) -> Result<Vec<String>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {key} FROM {t} AS t {JOIN} WHERE {condition} LIMIT {SAMPLES}",
        key = key_expr(table),
        t = table.name()
    );
    Ok(db
        .client()
        .query(&sql, &[])?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub fn run(db: &mut Db) -> Result<Verification> {
    let mut tables = Vec::new();
    let mut dropped = Vec::new();
    for table in Table::ALL {
        if !crate::db::relation_exists(db.client(), table.name())? {
            dropped.push(table);
            continue;
        }
        let sql = format!(
            "SELECT count(*) FILTER (WHERE {IS_NULL}), count(*) FILTER (WHERE {IS_ORPHAN}),
                    count(*) FILTER (WHERE {IS_WRONG})
               FROM {t} AS t {JOIN}",
            t = table.name()
        );
        let row = db
            .client()
            .query_one(&sql, &[])
            .with_context(|| format!("checking jobset_id in {}", table.name()))?;
        let (null_rows, orphans, wrong): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        tables.push(TableCheck {
            table,
            null_rows,
            orphans,
            wrong,
            null_samples: samples(db, table, IS_NULL, null_rows)?,
            orphan_samples: samples(db, table, IS_ORPHAN, orphans)?,
            wrong_samples: samples(db, table, IS_WRONG, wrong)?,
        });
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
