//! The per-page strategy (see PERF-NOTES.md): while no index contains jobset_id, an update
//! that finds room on its own heap page is a HOT update and touches none of Builds' ~17
//! indexes. Pages are full, so the first update on a page moves its row away; once that
//! transaction commits, the next visit prunes the dead version and the next row's new
//! version fits on the same page. So each transaction takes ONE row from each of many
//! pages, and a window of pages is worked in rounds until it holds no fillable NULL row.
//!
//! Each page's largest row goes first. Every HOT update after the first leaves its row a
//! little larger than it was (the filled `jobset_id`, and a line pointer the old version
//! keeps as a redirect), so the page's room runs out unless the row moved away first
//! freed enough; when it runs out, one more row moves, through every index. Taking the
//! largest row first took Builds' HOT share at 1M builds from 94.0 to 96.0 % and cut a
//! third of the walk's index insertions, the writes a 10M walk rewrites the most
//! (BENCHMARKS.md, "Which pages the walk writes").
//!
//! The window slides: pages join it a few per round and leave once their last row is
//! taken, so every round does about the same work. The first update on a page is the
//! expensive one (its row moves to another page, through all of Builds' indexes, and the
//! page's first change after a checkpoint writes the whole page to the WAL). A window
//! that started all its pages in one round wrote tens of MB of WAL in that round, and
//! Hydra's commits meanwhile waited to flush it (BENCHMARKS.md, "What the writer waits
//! for"); spread out, each round carries 1/rows-a-page of that cost.
//!
//! Pages are listed ahead in chunks (one TID range scan each) and each round updates its
//! rows by primary key. The index scan matters: unlike a TID scan, it prunes each heap page it
//! visits, which frees the dead version the previous round left there, so this round's
//! new version fits on the same page. Every update requires `jobset_id IS NULL` and
//! derives the value from the row's own project/jobset. Rows that a concurrent writer
//! moved out of the walked pages, and rows another transaction held locked when their
//! round came, are caught by the keyset sweep that follows.
//!
//! Builds only: Jobs has a single index, so HOT saves little there and the keyset walk
//! does the job.

use std::collections::VecDeque;

use anyhow::{Context, Result};
use bytes::{BufMut, BytesMut};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql, Type, accepts, to_sql_checked};
use postgres::{GenericClient, Statement};
use std::time::{Duration, Instant};

use super::Table;

/// Heap pages of a table now (the walk's end).
pub fn pages(c: &mut impl GenericClient, table: Table) -> Result<i64> {
    let row = c.query_one(
        "SELECT pg_relation_size(to_regclass($1)) / current_setting('block_size')::bigint",
        &[&table.name()],
    )?;
    Ok(row.get(0))
}

/// How a chunk of pages is read. A `ctid` range becomes a TID range scan from
/// PostgreSQL 14 on; before, the same condition scans the whole table, so there the
/// chunk's every possible line pointer is listed for a TID scan instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    TidRange,
    /// With the most line pointers a heap page can have.
    TidList {
        line_pointers: u16,
    },
}

impl Listing {
    pub fn for_server(server_version: i32, block_size: u32) -> Listing {
        if server_version >= 140_000 {
            Listing::TidRange
        } else {
            // (block size - page header) / (tuple header + line pointer): 291 on 8 kB pages.
            let line_pointers = u16::try_from((block_size - 24) / 28).unwrap_or(u16::MAX);
            Listing::TidList { line_pointers }
        }
    }

    /// The condition on `t.ctid`: from `$1` up to, not including, `$2`; or any of `$1`.
    /// The list is read through a sub-select: given the array itself, the planner charges
    /// a random page read for each of its thousands of TIDs and prefers other scans of
    /// Builds, a sequential one on a large table.
    fn condition(self) -> &'static str {
        match self {
            Listing::TidRange => "t.ctid >= $1 AND t.ctid < $2",
            Listing::TidList { .. } => "t.ctid = ANY (ARRAY(SELECT unnest($1::tid[])))",
        }
    }

    /// The parameters of the listing of pages `[first, first + count)`.
    pub fn params(self, first: i64, count: i64) -> Result<Vec<Box<dyn ToSql + Sync>>> {
        let (first, end) = (u32::try_from(first)?, u32::try_from(first + count)?);
        Ok(match self {
            Listing::TidRange => vec![Box::new(Tid::new(first, 0)), Box::new(Tid::new(end, 0))],
            Listing::TidList { line_pointers } => {
                let tids: Vec<Tid> = (first..end)
                    .flat_map(|page| (1..=line_pointers).map(move |line| Tid::new(page, line)))
                    .collect();
                vec![Box::new(tids)]
            }
        })
    }
}

/// The block size of the server's heap pages.
pub fn block_size(c: &mut impl GenericClient) -> Result<u32> {
    let row = c.query_one("SELECT current_setting('block_size')::int", &[])?;
    Ok(u32::try_from(row.get::<_, i32>(0))?)
}

/// A row version's address (`tid`), sent in binary. A TID listing holds every possible
/// line pointer of its pages, 291 a page; built on the server from text, they took longer
/// than the scan itself.
#[derive(Debug, Clone, Copy)]
struct Tid {
    page: u32,
    line: u16,
}

impl Tid {
    fn new(page: u32, line: u16) -> Tid {
        Tid { page, line }
    }
}

impl ToSql for Tid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_u32(self.page);
        out.put_u16(self.line);
        Ok(IsNull::No)
    }

    accepts!(TID);
    to_sql_checked!();
}

/// The listing query: page and id of the fillable NULL rows of the pages `Listing::params`
/// names, each page's largest row first.
pub fn listing_sql(table: Table, listing: Listing) -> String {
    format!(
        "SELECT (t.ctid::text::point)[0]::bigint, t.id FROM {rows} AND {cond}
          ORDER BY (t.ctid::text::point)[0], pg_column_size(t.*) DESC, t.ctid",
        rows = super::fillable_rows(table),
        cond = listing.condition()
    )
}

/// The ids of the fillable NULL rows of pages `[first, first + count)`, by page.
pub fn list_pages(
    c: &mut impl GenericClient,
    table: Table,
    listing: Listing,
    first: i64,
    count: i64,
) -> Result<Vec<(i64, Vec<i32>)>> {
    let sql = listing_sql(table, listing);
    let params = listing.params(first, count)?;
    // Stream the rows: only the ids are kept, never the whole result set.
    let mut rows = c.query_raw(&sql, params).with_context(|| {
        format!(
            "listing NULL rows of {} pages {first}..{}",
            table.name(),
            first + count
        )
    })?;
    let mut pages: Vec<(i64, Vec<i32>)> = Vec::new();
    while let Some(r) = rows.next()? {
        let (page, id): (i64, i32) = (r.get(0), r.get(1));
        match pages.last_mut() {
            Some((last, ids)) if *last == page => ids.push(id),
            _ => pages.push((page, vec![id])),
        }
    }
    Ok(pages)
}

/// A page in the window: its listed rows and how many rounds have taken one.
#[derive(Debug)]
struct Page {
    no: i64,
    ids: Vec<i32>,
    taken: usize,
}

/// The sliding window of pages: listed ahead, admitted a few per round, worked one row
/// per page per round, in page order. Pure bookkeeping; the caller lists and updates.
#[derive(Debug)]
pub struct Window {
    /// Listed, not yet admitted.
    listed: VecDeque<Page>,
    /// Admitted, in page order.
    active: VecDeque<Page>,
    /// The first page not listed yet.
    next_to_list: i64,
    rows_listed: u64,
    pages_listed: u64,
}

impl Window {
    pub fn new(start: i64) -> Window {
        Window {
            listed: VecDeque::new(),
            active: VecDeque::new(),
            next_to_list: start,
            rows_listed: 0,
            pages_listed: 0,
        }
    }

    pub fn next_to_list(&self) -> i64 {
        self.next_to_list
    }

    /// Listed pages waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.listed.len()
    }

    /// Add the pages of one listing, which covered pages up to `listed_to` (exclusive).
    pub fn add_listed(&mut self, pages: Vec<(i64, Vec<i32>)>, listed_to: i64) {
        for (no, ids) in pages {
            self.rows_listed += ids.len() as u64;
            self.pages_listed += 1;
            self.listed.push_back(Page { no, ids, taken: 0 });
        }
        self.next_to_list = listed_to;
    }

    /// How many pages join per round of `size` rows: as many as leave per round once the
    /// window is full (`size` / rows a page), so the window fills over one page's worth
    /// of rounds and then stays full.
    pub fn per_round(&self, size: usize) -> usize {
        let per_page = (self.rows_listed as f64 / self.pages_listed.max(1) as f64).max(1.0);
        ((size as f64 / per_page).ceil() as usize).max(1)
    }

    /// Where the next listing ends (exclusive) for rounds of `size` rows: a few rounds'
    /// worth of pages, at least `MIN_LISTING` pages, never past `total`. Computed again
    /// for every try of a listing, so that a listing cut off by the statement timeout is
    /// retried over fewer pages (the timeout halves `size`).
    pub fn listing_end(&self, size: usize, total: i64) -> i64 {
        let pages = (4 * self.per_round(size)).max(Self::MIN_LISTING) as i64;
        (self.next_to_list + pages).min(total)
    }

    /// The fewest pages a listing covers (one TID range scan: below this its own cost
    /// is mostly the round trip).
    const MIN_LISTING: usize = 16;

    /// Admit the pages for the next round of at most `size` rows (never more than `size`
    /// pages in the window).
    pub fn admit(&mut self, size: usize) {
        let room = size.saturating_sub(self.active.len());
        for _ in 0..self.per_round(size).min(room) {
            match self.listed.pop_front() {
                Some(p) => self.active.push_back(p),
                None => break,
            }
        }
    }

    /// The rows of the next round: the next row of each of the first `size` admitted
    /// pages (the oldest first, so they finish and make room). Taken only by `advance`,
    /// once the round has committed.
    pub fn peek(&self, size: usize) -> Vec<i32> {
        self.active
            .iter()
            .take(size)
            .map(|p| p.ids[p.taken])
            .collect()
    }

    /// The round of `n` rows (as `peek` gave them) committed; finished pages leave.
    pub fn advance(&mut self, n: usize) {
        for p in self.active.iter_mut().take(n) {
            p.taken += 1;
        }
        self.active.retain(|p| p.taken < p.ids.len());
    }

    /// Nothing listed is left to work (the caller knows whether more is to be listed).
    pub fn is_empty(&self) -> bool {
        self.active.is_empty() && self.listed.is_empty()
    }

    /// Where a re-run must list again from: the lowest page not finished.
    pub fn resume_from(&self) -> i64 {
        self.active
            .front()
            .or(self.listed.front())
            .map_or(self.next_to_list, |p| p.no)
    }
}

/// The statements every round runs, prepared once per walk. Sent as text, each was
/// parsed and planned again every round, with one more round trip: at short rounds
/// (`--target-batch-ms 1`) that cost was most of a round.
pub struct RoundStatements {
    table: Table,
    update: Statement,
    update_skipping_held: Statement,
    horizon: Statement,
}

/// A round's update of the rows `$1` (`SKIP LOCKED`: only the rows no other transaction
/// holds), with the count of rows updated and the transaction's id.
fn round_sql(table: Table, skip_locked: bool) -> String {
    let rows = if skip_locked {
        format!(
            "ARRAY(SELECT id FROM {t} WHERE id = ANY($1) AND jobset_id IS NULL
                     FOR NO KEY UPDATE SKIP LOCKED)",
            t = table.name()
        )
    } else {
        "$1".to_owned()
    };
    format!(
        "WITH u AS (
             UPDATE {t} AS t SET jobset_id = js.id FROM jobsets js
              WHERE t.id = ANY({rows}) AND t.jobset_id IS NULL
                AND js.project = t.project AND js.name = t.jobset
             RETURNING 1)
         SELECT count(*), txid_current_if_assigned()::text FROM u",
        t = table.name()
    )
}

impl RoundStatements {
    pub fn prepare(c: &mut impl GenericClient, table: Table) -> Result<RoundStatements> {
        let horizon = format!(
            "SELECT pid, coalesce(nullif(backend_type, 'client backend'), application_name, '')
                         || ': ' || left(coalesce(query, ''), 60)
               FROM pg_stat_activity
              WHERE pid <> pg_backend_pid() AND {}",
            holds_horizon_of("($1::text::bigint % 4294967296)::text::xid")
        );
        let context = || format!("preparing the rounds of {}", table.name());
        Ok(RoundStatements {
            table,
            update: c.prepare(&round_sql(table, false)).with_context(context)?,
            update_skipping_held: c.prepare(&round_sql(table, true)).with_context(context)?,
            horizon: c
                .prepare(&horizon)
                .context("preparing the check for old snapshots")?,
        })
    }
}

/// How the rounds deal with rows other transactions hold (see `held`).
///
/// A round waits at most `max` for a row lock (`SET LOCAL lock_timeout`): well under
/// `deadlock_timeout`, so that a round is never in a deadlock long enough for
/// PostgreSQL to pick a victim (which could be Hydra's evaluator), and under the
/// session's `lock_timeout`. When that runs out the round is done again at once with
/// `SKIP LOCKED`, leaving the held rows for the keyset sweep, and so are the rounds of
/// the next `SKIPPING` (a holder such as the evaluator keeps its rows for minutes, and
/// each round would wait for one again). Locking first always would cost a second
/// lookup and a WAL record per row: at 1M builds it made the walk 35 % slower, the
/// offline UPDATE of the same run 10 % (BENCHMARKS.md, "Rows held by Hydra").
#[derive(Debug)]
pub struct RowWaits {
    max: Duration,
    skipping_until: Option<Instant>,
    /// Rounds whose wait for a row lock ran out.
    pub given_up: u64,
    /// Rounds run with `SKIP LOCKED`.
    pub skipping: u64,
}

impl RowWaits {
    /// A round's longest wait for a row lock, at PostgreSQL's default `deadlock_timeout`
    /// (1 s).
    const MAX: Duration = Duration::from_millis(50);
    const SKIPPING: Duration = Duration::from_secs(5);

    /// With the server's `deadlock_timeout` and the session's `lock_timeout` (0: none).
    pub fn new(deadlock_timeout: Duration, lock_timeout: Duration) -> RowWaits {
        let max = crate::db::shorter_timeout(Self::MAX.min(deadlock_timeout / 2), lock_timeout);
        RowWaits {
            max: max.max(Duration::from_millis(1)),
            skipping_until: None,
            given_up: 0,
            skipping: 0,
        }
    }
}

/// Fill these rows (one transaction). Returns rows updated and the transaction's id
/// (`None` when it updated nothing). Rows held by other transactions: see [`RowWaits`].
/// A table lock also ends the first try after the short wait; the second waits for it
/// under the session's own `lock_timeout`, as before.
pub fn update_round(
    c: &mut impl GenericClient,
    st: &RoundStatements,
    ids: &[i32],
    waits: &mut RowWaits,
) -> Result<(u64, Option<String>)> {
    let what = || format!("updating one row per page of {}", st.table.name());
    let skip_now = waits.skipping_until.is_some_and(|t| Instant::now() < t);
    let row = if skip_now {
        waits.skipping += 1;
        c.query_one(&st.update_skipping_held, &[&ids])
            .with_context(what)?
    } else {
        c.batch_execute(&format!(
            "BEGIN; {}",
            crate::db::local_lock_timeout(waits.max)
        ))
        .with_context(what)?;
        match c.query_one(&st.update, &[&ids]) {
            Ok(row) => {
                c.batch_execute("COMMIT").with_context(what)?;
                row
            }
            Err(e) => {
                let e = anyhow::Error::from(e).context(what());
                let rolled_back = c.batch_execute("ROLLBACK");
                if crate::db::sqlstate(&e) != Some(postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                    return Err(e);
                }
                rolled_back.with_context(what)?;
                waits.given_up += 1;
                waits.skipping_until = Some(Instant::now() + RowWaits::SKIPPING);
                waits.skipping += 1;
                c.query_one(&st.update_skipping_held, &[&ids])
                    .with_context(what)?
            }
        }
    };
    let (n, xid): (i64, Option<String>) = (row.get(0), row.get(1));
    Ok((n as u64, xid))
}

/// A `pg_stat_activity` condition: the session is running a plain `VACUUM` (autovacuum's
/// or a client's; not `FULL`, not with `ANALYZE`). PostgreSQL leaves such a session's
/// snapshot out when it decides what may be pruned, so it does not stop HOT updates,
/// however long it runs (a VACUUM of a large Builds can take an hour).
pub const PLAIN_VACUUM: &str = r"(state = 'active'
     AND coalesce(query, '') ~* '^\s*(autovacuum:\s+)?vacuum\M'
     AND coalesce(query, '') !~* '(analyze|full)')";

/// A `pg_stat_activity` condition: the session holds back the pruning of the row versions
/// that transaction `xid` (an SQL expression of type xid) leaves dead, so that the next
/// round's updates of them could not be HOT. Either by its snapshot, as old as `xid`
/// (a plain VACUUM's does not count; see [`SNAPSHOT_COUNTS_HERE`] for which databases'
/// do), or by its own transaction id, older than `xid`: every snapshot taken after it
/// began, in any database and ours included, has that transaction as running, so it
/// counts whatever its database. The latter is what a session idle in a transaction that
/// has written shows (READ COMMITTED holds no snapshot between statements); a session
/// committing has a transaction id and no snapshot for a moment as well, and is not
/// waited for.
pub fn holds_horizon_of(xid: &str) -> String {
    format!(
        "(backend_xmin IS NOT NULL AND NOT {PLAIN_VACUUM} AND {SNAPSHOT_COUNTS_HERE}
          AND age(backend_xmin) >= age({xid})
          OR backend_xid IS NOT NULL AND (backend_xmin IS NOT NULL OR state = 'idle in transaction')
          AND age(backend_xid) > age({xid}))"
    )
}

/// A `pg_stat_activity` condition: the session's snapshot (`backend_xmin`) can hold back
/// the pruning of this database's tables. From PostgreSQL 14 only a snapshot of this
/// database can (or of none: a walsender carrying a standby's `hot_standby_feedback`);
/// before 14 any can. (engine_backfill's tests hold each kind in another database.)
pub const SNAPSHOT_COUNTS_HERE: &str = "(datname = current_database() OR datname IS NULL
      OR current_setting('server_version_num')::int < 140000)";

/// Other sessions whose snapshot is older than transaction `xid`: until they end, the
/// row versions `xid` left dead cannot be pruned, so the next round's updates could not
/// be HOT. (pid, what it is)
pub fn horizon_holders(
    c: &mut impl GenericClient,
    st: &RoundStatements,
    xid: &str,
) -> Result<Vec<(i32, String)>> {
    let rows = c.query(&st.horizon, &[&xid])?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(pages: &[(i64, usize)]) -> Vec<(i64, Vec<i32>)> {
        pages
            .iter()
            .map(|&(no, n)| (no, (0..n as i32).map(|i| no as i32 * 100 + i).collect()))
            .collect()
    }

    fn round(w: &mut Window, size: usize) -> Vec<i32> {
        let ids = w.peek(size);
        w.advance(ids.len());
        ids
    }

    #[test]
    fn a_rounds_wait_for_a_row_stays_under_half_the_deadlock_timeout_and_the_lock_timeout() {
        let ms = Duration::from_millis;
        assert_eq!(RowWaits::new(ms(1000), ms(2000)).max, ms(50));
        assert_eq!(RowWaits::new(ms(60), ms(2000)).max, ms(30));
        assert_eq!(RowWaits::new(ms(1000), ms(10)).max, ms(10));
        assert_eq!(RowWaits::new(ms(1000), Duration::ZERO).max, ms(50));
        assert_eq!(RowWaits::new(ms(1), ms(2000)).max, ms(1));
    }

    #[test]
    fn pages_join_a_few_per_round_and_leave_when_done() {
        // Four rows a page, rounds of 8: two pages join per round until 8 are in.
        let mut w = Window::new(0);
        w.add_listed(
            listed(&[
                (0, 4),
                (1, 4),
                (2, 4),
                (3, 4),
                (5, 4),
                (6, 4),
                (7, 4),
                (8, 4),
                (9, 4),
                (10, 4),
            ]),
            11,
        );
        let mut sizes = Vec::new();
        let mut taken = Vec::new();
        loop {
            w.admit(8);
            let ids = round(&mut w, 8);
            if ids.is_empty() {
                break;
            }
            sizes.push(ids.len());
            taken.extend(ids);
        }
        assert_eq!(sizes, vec![2, 4, 6, 8, 8, 6, 4, 2]);
        // Every listed row exactly once, and a page's rows in their listed order.
        let mut sorted = taken.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 40);
        let page0: Vec<i32> = taken.iter().copied().filter(|id| id / 100 == 0).collect();
        assert_eq!(page0, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_listing_covers_fewer_pages_after_a_halving_down_to_sixteen() {
        let mut w = Window::new(100);
        // Nothing listed yet: one row a page is assumed, four rounds' worth.
        assert_eq!(w.listing_end(64, 10_000), 356);
        assert_eq!(w.listing_end(32, 10_000), 228);
        assert_eq!(w.listing_end(2, 10_000), 116);
        // Four rows a page: a round of 64 rows takes 16 pages' worth of new rows.
        w.add_listed(listed(&[(100, 4), (101, 4)]), 102);
        assert_eq!(w.listing_end(64, 10_000), 102 + 64);
        assert_eq!(w.listing_end(32, 10_000), 102 + 32);
        assert_eq!(w.listing_end(8, 10_000), 102 + 16);
        // Never past the table's end.
        assert_eq!(w.listing_end(64, 150), 150);
    }

    #[test]
    fn resume_point_is_the_lowest_unfinished_page() {
        let mut w = Window::new(10);
        assert_eq!(w.resume_from(), 10);
        w.add_listed(listed(&[(12, 1), (13, 2)]), 20);
        assert_eq!(w.resume_from(), 12);
        w.admit(2);
        round(&mut w, 2);
        // Page 12 is done; page 13 still has a row.
        assert_eq!(w.resume_from(), 13);
        w.admit(2);
        round(&mut w, 2);
        assert_eq!(w.resume_from(), 20);
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn a_smaller_size_admits_nothing_until_the_window_drains() {
        let mut w = Window::new(0);
        w.add_listed(listed(&[(0, 3), (1, 3), (2, 3), (3, 3), (4, 3)]), 5);
        w.admit(3);
        assert_eq!(round(&mut w, 3).len(), 1);
        w.admit(3);
        w.admit(3);
        assert_eq!(round(&mut w, 3).len(), 3);
        // The batch was halved: only the two oldest pages are worked, none joins.
        w.admit(2);
        assert_eq!(round(&mut w, 2), vec![2, 101]);
    }
}
