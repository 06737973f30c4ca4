//! Backfill progress, kept in the database itself (schema `hydra_upgrade`, outside Hydra's
//! own `public` schema) and written in the same transaction as each keyset batch, or about
//! every second of the page walk: a re-run continues where the last committed batch ended, and
//! the database stays the one source of truth. `finalize` drops the schema at the end.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::db::Db;

const CREATE: &str = "
CREATE SCHEMA IF NOT EXISTS hydra_upgrade;
CREATE TABLE IF NOT EXISTS hydra_upgrade.progress (
    tbl           text PRIMARY KEY,
    strategy      text NOT NULL,
    phase         text NOT NULL,
    position      bigint NOT NULL,
    total         bigint NOT NULL,
    cursor        text,
    rows_updated  bigint NOT NULL DEFAULT 0,
    rows_skipped  bigint NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
)";

const SELECT: &str =
    "SELECT tbl, strategy, phase, position, total, cursor, rows_updated, rows_skipped
                        FROM hydra_upgrade.progress";

const UPSERT: &str = "
INSERT INTO hydra_upgrade.progress AS p (tbl, strategy, phase, position, total, cursor, rows_updated, rows_skipped)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (tbl) DO UPDATE SET strategy = $2, phase = $3, position = $4, total = $5, cursor = $6,
    rows_updated = $7, rows_skipped = $8, updated_at = now()";

/// Which pass a table is in.
pub const PHASE_PAGES: &str = "pages";
pub const PHASE_KEYS: &str = "keys";
/// Filling the rows listed in `held`, one at a time.
pub const PHASE_HELD: &str = "held";
pub const PHASE_DONE: &str = "done";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TableProgress {
    pub table: String,
    pub strategy: String,
    /// `pages` (per-page walk), `keys` (keyset walk or final sweep), `held` (the rows
    /// listed in `held`), `done`.
    pub phase: String,
    /// Next heap page (pages) or keys walked so far (keys).
    pub position: i64,
    pub total: i64,
    /// Keyset cursor (JSON), when in the keys phase.
    pub cursor: Option<String>,
    pub rows_updated: i64,
    pub rows_skipped: i64,
    #[serde(skip)]
    pub finished: bool,
}

impl TableProgress {
    pub fn new(table: &str, strategy: &str, phase: &str, total: i64) -> TableProgress {
        TableProgress {
            table: table.into(),
            strategy: strategy.into(),
            phase: phase.into(),
            position: 0,
            total,
            cursor: None,
            rows_updated: 0,
            rows_skipped: 0,
            finished: phase == PHASE_DONE,
        }
    }
}

pub fn ensure(db: &mut Db) -> Result<()> {
    db.client().batch_execute(CREATE).context(
        "creating the progress table hydra_upgrade.progress (the database role needs CREATE \
         on the database; Hydra's role owns its database on NixOS)",
    )
}

fn exists(db: &mut Db) -> Result<bool> {
    Ok(db
        .client()
        .query_one(
            "SELECT to_regclass('hydra_upgrade.progress') IS NOT NULL",
            &[],
        )?
        .get(0))
}

/// Every table's progress; empty when no backfill ever ran.
pub fn read_all(db: &mut Db) -> Result<Vec<TableProgress>> {
    if !exists(db)? {
        return Ok(Vec::new());
    }
    let rows = db.client().query(&format!("{SELECT} ORDER BY tbl"), &[])?;
    Ok(rows.iter().map(from_row).collect())
}

pub fn load(db: &mut Db, table: &str) -> Result<Option<TableProgress>> {
    let row = db
        .client()
        .query_opt(&format!("{SELECT} WHERE tbl = $1"), &[&table])
        .context("reading backfill progress")?;
    Ok(row.as_ref().map(from_row))
}

fn from_row(r: &postgres::Row) -> TableProgress {
    let phase: String = r.get(2);
    TableProgress {
        table: r.get(0),
        strategy: r.get(1),
        finished: phase == PHASE_DONE,
        phase,
        position: r.get(3),
        total: r.get(4),
        cursor: r.get(5),
        rows_updated: r.get(6),
        rows_skipped: r.get(7),
    }
}

/// Save progress through any client or transaction, so a batch and its progress commit
/// together.
pub fn save(c: &mut impl postgres::GenericClient, p: &TableProgress) -> Result<()> {
    c.execute(
        UPSERT,
        &[
            &p.table,
            &p.strategy,
            &p.phase,
            &p.position,
            &p.total,
            &p.cursor,
            &p.rows_updated,
            &p.rows_skipped,
        ],
    )
    .context("saving backfill progress")?;
    Ok(())
}

/// Remove the progress schema (after the final phase).
pub fn drop_all(db: &mut Db) -> Result<()> {
    db.client()
        .batch_execute("DROP SCHEMA IF EXISTS hydra_upgrade CASCADE")
        .context("dropping the hydra_upgrade schema")
}
