//! The per-page strategy (see PERF-NOTES.md): while no index contains jobset_id, an update
//! that finds room on its own heap page is a HOT update and touches none of Builds' ~17
//! indexes. Pages are full, so the first update on a page moves its row away; once that
//! transaction commits, the next visit prunes the dead version and the next row's new
//! version fits on the same page. So each transaction takes ONE row from each of many
//! pages, and a window of pages is worked in rounds until it holds no fillable NULL row.
//!
//! The window is listed once (one TID range scan) and each round updates its rows by
//! primary key. The index scan matters: unlike a TID scan, it prunes each heap page it
//! visits, which frees the dead version the previous round left there, so this round's
//! new version fits on the same page. Every update requires `jobset_id IS NULL` and
//! derives the value from the row's own project/jobset. Rows that a concurrent writer
//! moved out of the walked pages are caught by the keyset sweep that follows.
//!
//! Builds only: Jobs has a single index, so HOT saves little there and the keyset walk
//! does the job.

use anyhow::{Context, Result};
use postgres::GenericClient;
use postgres::fallible_iterator::FallibleIterator;

use super::Table;

/// Heap pages of a table now (the walk's end).
pub fn pages(c: &mut impl GenericClient, table: Table) -> Result<i64> {
    let row = c.query_one(
        "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::bigint",
        &[&table.name()],
    )?;
    Ok(row.get(0))
}

/// The ids of the fillable NULL rows of pages `[first, first + count)`, grouped by page.
pub fn list_window(
    c: &mut impl GenericClient,
    table: Table,
    first: i64,
    count: i64,
) -> Result<Vec<Vec<i32>>> {
    let sql = format!(
        "SELECT (t.ctid::text::point)[0]::bigint, t.id FROM {t} AS t
           JOIN jobsets js ON js.project = t.project AND js.name = t.jobset
          WHERE t.ctid >= $1::text::tid AND t.ctid < $2::text::tid AND t.jobset_id IS NULL
          ORDER BY t.ctid",
        t = table.name()
    );
    let from = format!("({first},0)");
    let to = format!("({},0)", first + count);
    // Stream the rows: only the ids are kept, never the whole result set.
    let mut rows = c.query_raw(&sql, [&from, &to]).with_context(|| {
        format!(
            "listing NULL rows of {} pages {first}..{}",
            table.name(),
            first + count
        )
    })?;
    let mut pages: Vec<Vec<i32>> = Vec::new();
    let mut last_page = None;
    while let Some(r) = rows.next()? {
        let (page, id): (i64, i32) = (r.get(0), r.get(1));
        if Some(page) != last_page {
            pages.push(Vec::new());
            last_page = Some(page);
        }
        pages.last_mut().expect("pushed above").push(id);
    }
    Ok(pages)
}

/// The `round`-th listed row of every page that has one.
pub fn round_ids(pages: &[Vec<i32>], round: usize) -> Option<Vec<i32>> {
    let picked: Vec<i32> = pages.iter().filter_map(|p| p.get(round)).copied().collect();
    (!picked.is_empty()).then_some(picked)
}

/// Fill these rows (one transaction). Returns rows updated and the transaction's id
/// (`None` when it updated nothing).
pub fn update_round(
    c: &mut impl GenericClient,
    table: Table,
    ids: &[i32],
) -> Result<(u64, Option<String>)> {
    let sql = format!(
        "WITH u AS (
             UPDATE {t} AS t SET jobset_id = js.id FROM jobsets js
              WHERE t.id = ANY($1) AND t.jobset_id IS NULL
                AND js.project = t.project AND js.name = t.jobset
             RETURNING 1)
         SELECT count(*), pg_current_xact_id_if_assigned()::text FROM u",
        t = table.name()
    );
    let row = c
        .query_one(&sql, &[&ids])
        .with_context(|| format!("updating one row per page of {}", table.name()))?;
    let (n, xid): (i64, Option<String>) = (row.get(0), row.get(1));
    Ok((n as u64, xid))
}

/// Other sessions whose snapshot is older than transaction `xid`: until they end, the
/// row versions `xid` left dead cannot be pruned, so the next round's updates could not
/// be HOT. (pid, what it is)
pub fn horizon_holders(c: &mut impl GenericClient, xid: &str) -> Result<Vec<(i32, String)>> {
    let rows = c.query(
        "SELECT pid, coalesce(nullif(backend_type, 'client backend'), application_name, '')
                     || ': ' || left(coalesce(query, ''), 60)
           FROM pg_stat_activity
          WHERE pid <> pg_backend_pid() AND backend_xmin IS NOT NULL
            AND age(backend_xmin) >= age($1::text::xid8::xid)",
        &[&xid],
    )?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_take_one_row_per_page() {
        let pages = vec![vec![1, 2], vec![5]];
        assert_eq!(round_ids(&pages, 0), Some(vec![1, 5]));
        assert_eq!(round_ids(&pages, 1), Some(vec![2]));
        assert_eq!(round_ids(&pages, 2), None);
    }
}
