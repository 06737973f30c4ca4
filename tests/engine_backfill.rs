//! The backfill and verify through the real binary: correctness, idempotence, orphans,
//! NULL rows from an older writer, the one-backfill-at-a-time lock, concurrent writers.

mod common;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use hydra_upgrade::backfill::Table;
use hydra_upgrade::backfill::keyset::{self, Cursor};
use hydra_upgrade::backfill::per_page::{self, Listing};
use hydra_upgrade::bench::pin::allowed_cpus;
use hydra_upgrade::dsn::Dsn;
use hydra_upgrade::workload::{self, WriterSpec};

fn backfill_is_correct_and_idempotent(strategy: &str) {
    let db = hydra_at(61);
    let digest = db.digest_without_jobset_id();
    assert!(db.wrong_or_null() > 0);
    let r = run_on(&db, &["--json", "backfill", "--strategy", strategy]);
    r.expect_code(0);
    assert_eq!(db.wrong_or_null(), 0, "every row has its own jobset's id");
    assert_eq!(
        db.digest_without_jobset_id(),
        digest,
        "no other column changed"
    );
    let v = run_on(&db, &["verify", "--json"]);
    v.expect_code(0);
    assert_eq!(v.json()["clean"], true);

    // a second run is a no-op
    let again = run_on(&db, &["backfill", "--strategy", strategy, "--json"]);
    again.expect_code(0);
    let report = last_json_document(&again.stdout);
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(t["rows_updated"], 0, "{t}");
    }
    assert_eq!(db.digest_without_jobset_id(), digest);
}

#[test]
fn per_page_backfill_is_correct_and_idempotent() {
    backfill_is_correct_and_idempotent("per-page");
}

#[test]
fn keyset_backfill_is_correct_and_idempotent() {
    backfill_is_correct_and_idempotent("keyset");
}

#[test]
fn per_page_updates_are_mostly_hot_and_the_table_barely_grows() {
    let db = hydra_at(61);
    let r = run_on(&db, &["--json", "backfill", "--strategy", "per-page"]);
    r.expect_code(0);
    let report = last_json_document(&r.stdout);
    let builds = &report["tables"][1];
    assert_eq!(builds["table"], "builds");
    assert_eq!(builds["strategy"], "per-page");
    let hot = builds["hot_share"].as_f64().unwrap();
    assert!(hot > 0.8, "HOT share {hot}");
    let growth = builds["bytes_after"].as_f64().unwrap() / builds["bytes_before"].as_f64().unwrap();
    assert!(growth < 1.15, "Builds grew by {growth}");
}

#[test]
fn auto_picks_keyset_when_an_index_contains_jobset_id() {
    let db = hydra_at(61);
    db.exec("CREATE INDEX test_idx ON builds (jobset_id)");
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "builds: strategy keyset (auto: index test_idx contains jobset_id",
    );
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn auto_warns_about_an_old_snapshot_and_names_its_pid() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    let c = holder.client();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM projects;")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    let r = run_on(&db, &["backfill", "--horizon-age-secs", "1"]);
    c.batch_execute("ROLLBACK").unwrap();
    r.expect_code(0);
    assert_contains(&r.stderr, &format!("pid {pid}"));
    assert_contains(&r.stderr, "strategy keyset (auto:");
    assert_eq!(db.wrong_or_null(), 0);
}

/// From PostgreSQL 14 a snapshot held in another database does not hold back pruning
/// here, and auto does not name it. Before 14 it does, and auto picks keyset, naming it.
#[test]
fn an_old_snapshot_in_another_database_counts_only_before_postgresql_14() {
    let db = hydra_at(61);
    let elsewhere = empty_db();
    let mut holder = elsewhere.connect();
    let c = holder.client();
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1;")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    let r = run_on(&db, &["--json", "backfill", "--horizon-age-secs", "1"]);
    c.batch_execute("ROLLBACK").unwrap();
    r.expect_code(0);
    let builds = &last_json_document(&r.stdout)["tables"][1];
    let said = format!("{}{}", r.stdout, r.stderr);
    if db.query_i64("SELECT current_setting('server_version_num')::bigint") >= 140000 {
        // (Not the strategy: another test's write transaction open over a second
        // would rightly turn auto to keyset.)
        assert!(!said.contains(&format!("pid {pid}")), "{said}");
    } else {
        assert_eq!(builds["strategy"], "keyset", "{builds}");
        assert_contains(&said, &format!("pid {pid}"));
    }
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn orphans_are_skipped_reported_and_fail_verify() {
    let db = hydra_at(61);
    db.exec(
        "SET session_replication_role = replica;
         INSERT INTO jobsets (name, project, nixexprinput, nixexprpath, emailoverride) VALUES ('gone', 'project-1', 'src', 'x.nix', '');
         INSERT INTO jobs (project, jobset, name) VALUES ('project-1', 'gone', 'orphan-job');
         INSERT INTO builds (finished, timestamp, project, jobset, job, drvpath, system)
              SELECT 0, 1, 'project-1', 'gone', 'orphan-job', '/nix/store/orphan-' || g, 'x86_64-linux' FROM generate_series(1, 3) g;
         DELETE FROM jobsets WHERE name = 'gone';",
    );
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "3 NULL rows match no jobset (orphans)");
    let v = run_on(&db, &["verify"]);
    v.expect_code(7);
    assert_contains(&v.stdout, "builds: 0 NULL rows to fill, 3 orphan rows");
    assert_contains(&v.stdout, "project-1:gone:orphan-job");
    assert_contains(&v.stdout, "(project-1:gone)");
    let j = run_on(&db, &["verify", "--json"]);
    j.expect_code(7);
    assert_eq!(j.json()["tables"][1]["orphans"], 3);
    // finalize is refused while they exist, and changes nothing
    run_on(&db, &["finalize"]).expect_code(7);
    assert_eq!(db.version(), 61);
}

/// Builds' heap pages read (from the buffer cache or not) as the statistics count them,
/// once they have stopped changing (a finished session's counts arrive a little later
/// before PostgreSQL 15).
fn settled_heap_reads(db: &TestDb) -> i64 {
    let read = || {
        db.query_i64(
            "SELECT coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0)
               FROM pg_statio_user_tables WHERE relname = 'builds'",
        )
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(1_200));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// With NULL rows, orphans and wrong values all present, `verify` gives exact counts and
/// up to ten samples of each that agree with them, from at most two reads of Builds: the
/// counts, then one scan for every kind's samples. (A query per kind read it again for
/// each kind, and the stage check before it counted NULL rows with one more.)
#[test]
fn verify_counts_and_samples_every_kind_in_two_reads_of_builds() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    db.exec(
        "SET session_replication_role = replica;
         UPDATE builds SET jobset_id = NULL WHERE id IN (SELECT id FROM builds ORDER BY id DESC LIMIT 12);
         INSERT INTO jobsets (name, project, nixexprinput, nixexprpath, emailoverride) VALUES ('gone', 'project-1', 'src', 'x.nix', '');
         INSERT INTO jobs (project, jobset, name) VALUES ('project-1', 'gone', 'orphan-job');
         INSERT INTO builds (finished, timestamp, project, jobset, job, drvpath, system)
              SELECT 0, 1, 'project-1', 'gone', 'orphan-job', '/nix/store/orphan-' || g, 'x86_64-linux' FROM generate_series(1, 2) g;
         DELETE FROM jobsets WHERE name = 'gone';
         UPDATE builds SET jobset_id = jobset_id + 1 WHERE id = (SELECT min(id) FROM builds);",
    );
    // No autovacuum or autoanalyze of Builds while verify is counted: either reads the
    // whole table (ANALYZE samples all of so small a table), and one that began during
    // verify once made it read as three reads (on PostgreSQL 10, in .ci/run).
    db.exec("ALTER TABLE builds SET (autovacuum_enabled = false)");
    let pages =
        db.query_i64("SELECT pg_relation_size('builds') / current_setting('block_size')::bigint");
    let before = settled_heap_reads(&db);
    let v = run_on(&db, &["verify", "--json"]);
    v.expect_code(7);
    let reads = (settled_heap_reads(&db) - before) as f64 / pages as f64;
    let builds = &v.json()["tables"][1];
    assert_eq!(builds["table"], "builds", "{builds}");
    let len = |k: &str| builds[k].as_array().unwrap().len();
    assert_eq!(
        (
            builds["null_rows"].as_i64(),
            builds["orphans"].as_i64(),
            builds["wrong"].as_i64()
        ),
        (Some(12), Some(2), Some(1)),
        "{builds}"
    );
    assert_eq!(
        (
            len("null_samples"),
            len("orphan_samples"),
            len("wrong_samples")
        ),
        (10, 2, 1),
        "{builds}"
    );
    let wrong = builds["wrong_samples"][0].as_str().unwrap();
    let first = db.query_i64("SELECT min(id)::bigint FROM builds");
    assert!(wrong.starts_with(&format!("build {first} (")), "{wrong}");
    // The samples here lie at both ends of the table: their scan reads all of it.
    assert!(
        reads <= 2.1,
        "verify read {reads:.2} times Builds' {pages} pages"
    );
}

#[test]
fn null_rows_from_an_older_writer_are_caught_by_verify() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    let stop = Arc::new(AtomicBool::new(false));
    let dsn = Dsn::parse(&db.dsn).unwrap();
    let spec = WriterSpec {
        with_jobset_id: false,
        pause: Duration::ZERO,
        seed: 3,
        max_ops: 40,
        slice: (1, 0),
    };
    let stats = workload::run(&dsn, &spec, stop).unwrap();
    assert!(stats.inserts > 0);
    // The test cluster runs on this machine: each operation's waits for a CPU (its
    // server process's and its own) were read.
    assert!(stats.ops.iter().all(|op| op.cpu_wait_us.is_some()));
    let v = run_on(&db, &["verify"]);
    v.expect_code(7);
    assert_contains(
        &v.stdout,
        &format!("builds: {} NULL rows to fill", stats.inserts),
    );
    // A new backfill run picks them up: listed in one read and filled by key, without
    // walking the table again.
    let again = run_on(&db, &["--json", "backfill"]);
    again.expect_code(0);
    let report = last_json_document(&again.stdout);
    let builds = &report["tables"][1];
    assert_eq!(builds["strategy"], "listed", "{builds}");
    assert_eq!(builds["rows_updated"], stats.inserts, "{builds}");
    assert_eq!(builds["held_rows_filled_after"], stats.inserts, "{builds}");
    run_on(&db, &["verify"]).expect_code(0);
}

/// A run started while the session of one that has just ended still holds the upgrade
/// lock (a tool killed outright leaves its session until the statement it ran ends)
/// waits for it to be let go, and goes on.
#[test]
fn a_backfill_waits_for_the_upgrade_lock_of_a_session_about_to_end() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    holder.take_upgrade_lock().unwrap();
    let holder_pid = holder
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get::<_, i32>(0);
    let handle = spawn_on(&db, &["backfill"]);
    // Until the run has tried the lock (its last statement names it) and waits.
    wait_for("the run to try the lock", || {
        if let Some(out) = handle.try_wait().unwrap() {
            panic!(
                "the run ended before the lock was let go: {:?}\n{}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND pid NOT IN ({holder_pid}, pg_backend_pid())
                AND query ILIKE '%advisory%'"
        )) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(holder);
    let out = handle.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_contains(
        &stderr,
        &format!("the upgrade lock is held by pid {holder_pid}"),
    );
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn a_second_backfill_is_refused_while_one_runs() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    holder.take_upgrade_lock().unwrap();
    let r = run_on(&db, &["backfill"]);
    r.expect_code(8);
    assert_contains(&r.stderr, "waiting up to 10 s for it to be let go");
    assert_contains(
        &r.stderr,
        "another hydra-upgrade is already working on this database: pid",
    );
    assert_eq!(
        db.query_i64("SELECT count(*) FROM builds WHERE jobset_id IS NOT NULL"),
        0,
        "nothing changed"
    );
    let s = run_on(&db, &["status"]);
    s.expect_code(0);
    assert_contains(&s.stdout, "running now:       hydra-upgrade pid");
}

#[test]
fn concurrent_writers_see_no_error_and_lose_no_update() {
    let db = hydra_at(61);
    let digest_jobs_before = db
        .query_string("SELECT md5(string_agg(name, ',' ORDER BY project, jobset, name)) FROM jobs");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let dsn = Dsn::parse(&db.dsn).unwrap();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let spec = WriterSpec {
                    with_jobset_id: true,
                    pause: Duration::from_millis(1),
                    seed: 10 + i,
                    max_ops: 0,
                    slice: (2, i as i32),
                };
                workload::run(&dsn, &spec, stop).unwrap()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // small batches and a pause keep the backfill running alongside the writers
    let r = run_on(
        &db,
        &[
            "backfill",
            "--strategy",
            "per-page",
            "--batch-size",
            "8",
            "--max-batch-size",
            "16",
            "--pause-ms",
            "2",
        ],
    );
    stop.store(true, Ordering::SeqCst);
    let stats: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    r.expect_code(0);
    let mut check = db.connect();
    for s in &stats {
        assert_eq!(s.errors, 0, "writer errors: {:?}", s.error_samples);
        assert!(
            s.updates > 10 && s.inserts > 10,
            "writers did work: {} updates, {} inserts",
            s.updates,
            s.inserts
        );
        let lost = workload::lost_updates(&mut check, s).unwrap();
        assert!(lost.is_empty(), "lost updates on builds {lost:?}");
    }
    assert_eq!(db.wrong_or_null(), 0);
    run_on(&db, &["verify"]).expect_code(0);
    assert_eq!(
        db.query_string(
            "SELECT md5(string_agg(name, ',' ORDER BY project, jobset, name)) FROM jobs"
        ),
        digest_jobs_before
    );
}

#[test]
fn per_page_waits_out_a_short_old_snapshot_and_keeps_hot() {
    // A report (or an autovacuum ANALYZE) holding a snapshot when the backfill starts.
    per_page_waits_out_and_keeps_hot(
        "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM projects;",
        false,
    );
}

#[test]
fn per_page_waits_out_a_short_transaction_idle_after_a_write_and_keeps_hot() {
    // A client that wrote and waits in its transaction: READ COMMITTED, so no snapshot
    // between statements, but its transaction id holds pruning back as well.
    per_page_waits_out_and_keeps_hot("BEGIN; SELECT txid_current();", false);
}

#[test]
fn per_page_waits_out_a_write_transaction_in_another_database_and_keeps_hot() {
    // Every snapshot taken while it runs, ours included, has it as running: whatever
    // the database, it holds pruning back here too (a snapshot of another database
    // does not from PostgreSQL 14: an_old_snapshot_in_another_database_...).
    per_page_waits_out_and_keeps_hot("BEGIN; SELECT txid_current();", true);
}

/// The backfill started while another session (of another database if `elsewhere`)
/// runs `hold` and stays in its transaction waits for it between rounds, and its
/// updates stay HOT.
fn per_page_waits_out_and_keeps_hot(hold: &str, elsewhere: bool) {
    let db = hydra_at(61);
    let other = empty_db();
    let mut holder = if elsewhere { &other } else { &db }.connect();
    let c = holder.client();
    c.batch_execute(hold).unwrap();
    let handle = spawn_on(
        &db,
        &[
            "--json",
            "backfill",
            "--strategy",
            "per-page",
            "--horizon-age-secs",
            "3600",
        ],
    );
    // Hold the snapshot until Builds' first round has committed (the next round must
    // then wait for it), and a little longer.
    wait_for("Builds' first row", || builds_started(&db));
    std::thread::sleep(Duration::from_millis(400));
    c.batch_execute("ROLLBACK").unwrap();
    let out = handle.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let builds = &last_json_document(&stdout)["tables"][1];
    assert!(
        builds["horizon_wait_seconds"].as_f64().unwrap() > 0.1,
        "{builds}"
    );
    let hot = builds["hot_share"].as_f64().unwrap();
    assert!(
        hot > 0.8,
        "HOT share {hot} although the snapshot was waited out"
    );
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn a_snapshot_that_stays_does_not_stall_the_per_page_walk() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    let c = holder.client();
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM projects;")
        .unwrap();
    let r = run_on(
        &db,
        &[
            "backfill",
            "--strategy",
            "per-page",
            "--horizon-age-secs",
            "3600",
            "--horizon-wait-ms",
            "5",
        ],
    );
    c.batch_execute("ROLLBACK").unwrap();
    r.expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

/// Before PostgreSQL 14 a `ctid` range scans the whole table, so the per-page walk lists
/// every possible line pointer instead. Both listings must find the same rows, each
/// through its own kind of TID scan (never a sequential scan of Builds).
#[test]
fn both_page_listings_find_the_same_rows_through_tid_scans() {
    let db = hydra_at(61);
    let mut conn = db.connect();
    let version = conn.server_version().unwrap();
    let c = conn.client();
    let tid_list = Listing::for_server(130_000, per_page::block_size(c).unwrap());
    assert_eq!(tid_list, Listing::TidList { line_pointers: 291 });
    let pages = per_page::pages(c, Table::Builds).unwrap();
    assert!(pages > 20, "the fixture has {pages} pages");
    // Some rows already filled, some moved: a partly walked table.
    c.batch_execute(&fill_builds_where("b.id % 3 = 0")).unwrap();
    for (first, count) in [(0, 8), (5, 3), (pages - 4, 4), (0, pages + 10)] {
        let range =
            per_page::list_pages(c, Table::Builds, Listing::TidRange, first, count).unwrap();
        let list = per_page::list_pages(c, Table::Builds, tid_list, first, count).unwrap();
        assert!(!range.is_empty(), "pages {first}+{count} hold NULL rows");
        assert_eq!(range, list, "pages {first}+{count}");
        assert!(range.iter().all(|(p, _)| *p >= first && *p < first + count));
    }
    let pages = per_page::pages(c, Table::Builds).unwrap();
    let total: usize = per_page::list_pages(c, Table::Builds, tid_list, 0, pages)
        .unwrap()
        .iter()
        .map(|(_, ids)| ids.len())
        .sum();
    let fillable: i64 = c
        .query_one(
            "SELECT count(*) FROM builds b JOIN jobsets js
                 ON js.project = b.project AND js.name = b.jobset
              WHERE b.jobset_id IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(total as i64, fillable, "every fillable NULL row is listed");
    // The listing the backfill uses on this server must be a TID scan of the requested
    // pages. (A TID range scan exists only from PostgreSQL 14: before, the range listing
    // is a sequential scan of Builds, which is why it is not used there.)
    let mut expect = vec![(tid_list, "Tid Scan")];
    if version >= 140_000 {
        expect.push((Listing::TidRange, "Tid Range Scan"));
    }
    for (listing, node) in expect {
        let plan: Vec<String> = c
            .query(
                &format!("EXPLAIN {}", per_page::listing_sql(Table::Builds, listing)),
                &listing
                    .params(3, 6)
                    .unwrap()
                    .iter()
                    .map(|p| p.as_ref() as &(dyn postgres::types::ToSql + Sync))
                    .collect::<Vec<_>>(),
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains(&format!("{node} on builds")),
            "{listing:?}:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan on builds"), "{listing:?}:\n{plan}");
    }
    assert_eq!(Listing::for_server(130_011, 8192), tid_list);
    assert_eq!(Listing::for_server(140_000, 8192), Listing::TidRange);
    assert_eq!(
        Listing::for_server(version, 8192),
        if version >= 140_000 {
            Listing::TidRange
        } else {
            tid_list
        }
    );
}

/// Each page's largest row is listed first, so that the walk's first update on a full
/// page, the one that must move its row to another page (through every index), frees
/// the most room: each HOT update after it grows its row a little (the filled
/// `jobset_id`, a line pointer), and a page whose room runs out moves a second row. At 1M
/// builds this took Builds' HOT share from 94.0 to 96.0 % (BENCHMARKS.md, "Which pages
/// the walk writes").
#[test]
fn each_pages_largest_row_is_listed_first() {
    let db = hydra_at(61);
    let mut conn = db.connect();
    let c = conn.client();
    let pages = per_page::pages(c, Table::Builds).unwrap();
    let tid_list = Listing::for_server(130_000, per_page::block_size(c).unwrap());
    // Each row's size and line on its page, by id.
    let rows: std::collections::HashMap<i32, (i32, i64)> = c
        .query(
            "SELECT id, pg_column_size(b.*), (ctid::text::point)[1]::bigint FROM builds b",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    for listing in [Listing::TidRange, tid_list] {
        let (mut pages_seen, mut reordered) = (0, 0);
        for (page, ids) in per_page::list_pages(c, Table::Builds, listing, 0, pages).unwrap() {
            let sizes: Vec<i32> = ids.iter().map(|id| rows[id].0).collect();
            assert!(
                sizes.windows(2).all(|w| w[0] >= w[1]),
                "{listing:?}: page {page}'s rows by size {sizes:?}"
            );
            // The page's own order (by line) would have begun with another row.
            let first_by_line = ids.iter().min_by_key(|id| rows[id].1).unwrap();
            pages_seen += 1;
            reordered += usize::from(*first_by_line != ids[0]);
        }
        assert!(pages_seen > 20, "{listing:?}: {pages_seen} pages listed");
        assert!(
            reordered > 0,
            "{listing:?}: on every page the first row was the largest: the fixture proves nothing"
        );
    }
}

/// A keyset batch (the keyset strategy, and the sweep after the page walk) reads its own
/// span of keys, however far into the table it is. Its planner statistics are the ones of
/// before the backfill (every jobset_id NULL; autoanalyze is held off meanwhile), and with
/// them the Builds batch once merge-joined a scan of the whole primary key from its first
/// entry: every batch read the table up to its span, the walk was quadratic in the
/// table's size. (The Jobs batch is planned as a nested loop; checked all the same.)
#[test]
fn a_keyset_batch_reads_only_its_own_span() {
    let db = hydra_at(61);
    let mut conn = db.connect();
    // The schema a backfill makes first: a batch lists the rows others hold there.
    hydra_upgrade::backfill::state::ensure(&mut conn).unwrap();
    hydra_upgrade::backfill::held::ensure(&mut conn).unwrap();
    let c = conn.client();
    c.batch_execute(&format!(
        "ANALYZE builds; ANALYZE jobs;
         {};
         UPDATE jobs j SET jobset_id = js.id FROM jobsets js
          WHERE js.project = j.project AND js.name = j.jobset",
        fill_builds_where("b.id <= 11000")
    ))
    .unwrap();
    let max_id: i32 = c
        .query_one("SELECT max(id) FROM builds", &[])
        .unwrap()
        .get(0);
    let (builds, jobs) = (
        db.query_i64("SELECT count(*) FROM builds"),
        db.query_i64("SELECT count(*) FROM jobs"),
    );
    assert!(
        builds >= 12_000 && max_id > 11_000,
        "{builds} builds, max id {max_id}"
    );
    // Tuples read from a table, through any scan, by this session since its counters were
    // last reported (so only differences within one transaction mean anything).
    let read = |tx: &mut postgres::Transaction, table: &str| -> i64 {
        tx.query_one(
            "SELECT pg_stat_get_xact_tuples_fetched(to_regclass($1))
                  + pg_stat_get_xact_tuples_returned(to_regclass($1))",
            &[&table],
        )
        .unwrap()
        .get(0)
    };

    // On a table this small a sequential scan is the cheaper way to read 2,000 ids;
    // on a large one it is not. Forbidden here, so that what is counted is the join.
    c.batch_execute("SET enable_seqscan = off").unwrap();
    // Builds, the last 2,000 ids: a few NULL rows left (above 11,000), the rest filled.
    let mut tx = c.transaction().unwrap();
    let mut cursor = Cursor::Id {
        after: i64::from(max_id) - 2_000,
        upper: max_id.into(),
    };
    let before = read(&mut tx, "builds");
    let batch = keyset::batch(&mut tx, &mut cursor, 2_000).unwrap();
    assert!(batch.done && batch.updated > 0, "{batch:?}");
    let n = read(&mut tx, "builds") - before;
    assert!(
        n <= 4_000,
        "a batch of 2,000 ids read {n} of {builds} Builds rows"
    );
    tx.commit().unwrap();

    // Jobs, 300 keys two thirds of the way in; every key after them set back to NULL.
    let key: (String, String, String) = {
        let r = c
            .query_one(
                "SELECT project, jobset, name FROM jobs ORDER BY 1, 2, 3 OFFSET $1 LIMIT 1",
                &[&(jobs * 2 / 3)],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    c.execute(
        "UPDATE jobs SET jobset_id = NULL WHERE (project, jobset, name) > ($1, $2, $3)",
        &[&key.0, &key.1, &key.2],
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    let mut cursor = Cursor::Key { after: Some(key) };
    let before = read(&mut tx, "jobs");
    let batch = keyset::batch(&mut tx, &mut cursor, 300).unwrap();
    assert_eq!((batch.walked, batch.updated), (300, 300), "{batch:?}");
    let n = read(&mut tx, "jobs") - before;
    assert!(n <= 900, "a batch of 300 keys read {n} of {jobs} Jobs rows");
    tx.commit().unwrap();
}

#[test]
fn a_role_that_may_only_read_gets_exit_16_and_a_hint() {
    let db = hydra_at(61);
    db.exec(
        "DO $$ BEGIN CREATE ROLE hu_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO hu_reader",
    );
    let dsn = cluster().dsn_string(&db.name, "hu_reader");
    run(&["--db", &dsn, "status"]).expect_code(0);
    let r = run(&["--db", &dsn, "backfill"]);
    r.expect_code(16);
    assert_contains(&r.stderr, "permission denied");
    assert_contains(
        &r.stderr,
        "hint: connect as the role that owns Hydra's tables",
    );
    assert_eq!(
        db.query_i64("SELECT count(*) FROM builds WHERE jobset_id IS NOT NULL"),
        0
    );
}

#[test]
fn autoanalyze_is_held_off_during_the_walk_only() {
    let db = hydra_at(61);
    // Slow rounds, so the walk is seen while it runs.
    let handle = spawn_on(
        &db,
        &["backfill", "--strategy", "per-page", "--pause-ms", "30"],
    );
    wait_for("Builds' first row", || builds_started(&db));
    for table in ["jobs", "builds"] {
        assert_eq!(
            reloptions(&db, table),
            "{autovacuum_analyze_threshold=2000000000}",
            "{table}"
        );
    }
    let out = handle.wait().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(reloptions(&db, "builds"), "");
    assert_eq!(reloptions(&db, "jobs"), "");

    // An owner's own threshold is theirs: left as it is.
    let db = hydra_at(61);
    db.exec("ALTER TABLE builds SET (autovacuum_analyze_threshold = 5000)");
    let r = run_on(&db, &["backfill", "--strategy", "per-page"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "builds: autovacuum_analyze_threshold is set (5000)",
    );
    assert_eq!(
        reloptions(&db, "builds"),
        "{autovacuum_analyze_threshold=5000}"
    );
}

/// A backfill killed outright (SIGKILL, systemd's stop timeout) leaves autoanalyze held
/// off; if the admin then finished with Hydra's own `hydra-init`, neither `backfill` nor
/// `finalize` has work left, and they reset it on their way out ("nothing to ..."),
/// leaving an owner's own threshold alone.
#[test]
fn a_hold_off_left_behind_is_reset_when_nothing_is_left_to_do() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    db.upgrade_to(65);
    let hold_off = "ALTER TABLE builds SET (autovacuum_analyze_threshold = 2000000000);
                    ALTER TABLE jobs SET (autovacuum_analyze_threshold = 2000000000)";
    db.exec(hold_off);
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "nothing to backfill");
    assert_eq!(reloptions(&db, "builds"), "");
    assert_eq!(reloptions(&db, "jobs"), "");

    db.exec(hold_off);
    db.exec("ALTER TABLE jobs SET (autovacuum_analyze_threshold = 5000)");
    let r = run_on(&db, &["finalize"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "nothing to do");
    assert_eq!(reloptions(&db, "builds"), "");
    assert_eq!(
        reloptions(&db, "jobs"),
        "{autovacuum_analyze_threshold=5000}"
    );
}

#[test]
fn the_backfill_keeps_itself_and_its_server_process_on_one_cpu() {
    let db = hydra_at(61);
    let cpus = std::thread::available_parallelism().unwrap().get();
    if cpus < 2 {
        let r = run_on(&db, &["--json", "backfill"]);
        r.expect_code(0);
        let (events, _) = r.json_lines();
        let why = events.iter().find(|e| e["event"] == "not_pinned");
        assert!(why.is_some_and(|e| e["why"].as_str().unwrap().contains("CPU(s) usable")));
        return;
    }
    // A session on the first Jobs row holds the backfill at its first batch, where it
    // is looked at.
    let mut holder = db.connect();
    let c = holder.client();
    c.batch_execute("BEGIN; SELECT 1 FROM jobs ORDER BY project, jobset, name LIMIT 1 FOR UPDATE;")
        .unwrap();
    let handle = spawn_on(&db, &["--json", "backfill", "--lock-timeout-ms", "60000"]);
    let ours = handle.pids()[0];
    let server = wait_for_value("the backfill to wait for the row", || {
        let pid = db.query_i64(&format!(
            "SELECT coalesce(max(pid), 0)::bigint FROM pg_stat_activity
              WHERE datname = '{}' AND wait_event_type = 'Lock'",
            db.name
        ));
        (pid != 0).then_some(pid as u32)
    });
    let cpu = allowed_cpus(server).unwrap();
    let seen_ours = allowed_cpus(ours).ok();
    c.batch_execute("COMMIT").unwrap();
    let out = handle.wait().unwrap();
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.expect_code(0);
    assert!(
        cpu.parse::<usize>().is_ok(),
        "the server process {server} may run on CPUs {cpu}, not one"
    );
    assert_eq!(
        seen_ours.as_deref(),
        Some(cpu.as_str()),
        "this tool on its CPU too"
    );
    let (events, _) = r.json_lines();
    let pinned = events
        .iter()
        .find(|e| e["event"] == "pinned")
        .unwrap_or_else(|| panic!("no pinned event:\n{}", r.stdout));
    assert_eq!(pinned["cpu"].to_string(), cpu);
    assert_eq!(pinned["server_pid"], server);
    assert_eq!(db.wrong_or_null(), 0);

    // Off: neither pinned nor a word about it.
    let db = hydra_at(61);
    let r = run_on(&db, &["--json", "backfill", "--pin-cpu", "off"]);
    r.expect_code(0);
    let (events, _) = r.json_lines();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "pinned" || e["event"] == "not_pinned"),
        "{}",
        r.stdout
    );
    // A CPU neither may use: a warning, and the backfill runs unpinned.
    let db = hydra_at(61);
    let r = run_on(&db, &["backfill", "--pin-cpu", "4096"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "warning: backfill: not kept on one CPU: CPU 4096 is not one both",
    );
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn the_configuration_file_chooses_the_cpu_pinning_and_the_command_line_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let path = config.to_str().unwrap();
    let write = |pin: &str| {
        std::fs::write(
            &config,
            serde_json::json!({ "backfill": { "pin_cpu": pin } }).to_string(),
        )
        .unwrap()
    };

    // "off" in the file: neither pinned nor a word about it.
    write("off");
    let db = hydra_at(61);
    let r = run_on(&db, &["--config", path, "--json", "backfill"]);
    r.expect_code(0);
    let (events, _) = r.json_lines();
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "pinned" || e["event"] == "not_pinned"),
        "{}",
        r.stdout
    );
    // The command line wins over the file: a CPU neither may use is warned about.
    let db = hydra_at(61);
    let r = run_on(&db, &["--config", path, "backfill", "--pin-cpu", "4096"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "warning: backfill: not kept on one CPU: CPU 4096",
    );
    // A CPU number from the file is used as one.
    write("4096");
    let db = hydra_at(61);
    let r = run_on(&db, &["--config", path, "backfill"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "warning: backfill: not kept on one CPU: CPU 4096",
    );
    assert_eq!(db.wrong_or_null(), 0);

    // A value that is none of them: the configuration error, naming the file and the value.
    write("first");
    let db = hydra_at(61);
    let r = run_on(&db, &["--config", path, "backfill"]);
    r.expect_code(3);
    assert_contains(&r.stderr, path);
    assert_contains(
        &r.stderr,
        "expected auto, off or a CPU number, not \"first\"",
    );
}

/// `backfill::run` as `upgrade` calls it (the library, on a connection it goes on using),
/// with the pinning off so that tests running side by side keep their CPUs, and `adjust`
/// applied to the command line's defaults.
fn backfill_on(
    conn: &mut hydra_upgrade::db::Db,
    adjust: impl FnOnce(&mut hydra_upgrade::backfill::Options),
) -> anyhow::Result<()> {
    let mut opts = hydra_upgrade::backfill::Options::from_args(
        &hydra_upgrade::cli::BackfillArgs::defaults(),
        &hydra_upgrade::config::Config::default(),
    );
    opts.pin_cpu = hydra_upgrade::backfill::one_cpu::PinCpu::Off;
    adjust(&mut opts);
    let out = hydra_upgrade::progress::Out::new(true);
    let interrupt = hydra_upgrade::interrupt::Interrupt::install()?;
    hydra_upgrade::backfill::run(conn, &opts, &out, &interrupt).map(|_| ())
}

/// The backfill's timeouts and asynchronous commit are its own: `upgrade` goes on with the
/// same connection to verify (a count over all of Builds, minutes at tens of millions of
/// rows, which the backfill's 120 s statement_timeout would cut off) and to finalize
/// (whose commits must not be asynchronous). So the connection comes back with the
/// server's settings, after a backfill that finished and after one that failed.
#[test]
fn the_backfill_hands_its_connection_back_with_the_servers_settings() {
    let db = hydra_at(61);
    let mut conn = db.connect();
    let servers = session_settings(&mut conn);
    assert_eq!(servers, ["0", "0", "on"], "the test cluster's defaults");
    backfill_on(&mut conn, |_| {}).unwrap();
    assert_eq!(db.wrong_or_null(), 0);
    assert_eq!(
        session_settings(&mut conn),
        servers,
        "after a backfill that finished"
    );

    // One that fails: every Builds row locked past every retry.
    db.exec("UPDATE builds SET jobset_id = NULL");
    let mut holder = db.connect();
    holder
        .client()
        .batch_execute("BEGIN; SELECT 1 FROM builds FOR UPDATE")
        .unwrap();
    let failed = backfill_on(&mut conn, |o| {
        o.lock_timeout = Duration::from_millis(50);
        o.max_retries = 0;
    });
    holder.client().batch_execute("COMMIT").unwrap();
    let e = failed.expect_err("every Builds row was locked");
    assert!(
        format!("{e:#}").contains("lock contention"),
        "failed for another reason: {e:#}"
    );
    assert_eq!(
        session_settings(&mut conn),
        servers,
        "after a backfill that failed"
    );
}

/// Before the walk, each table is searched for a NULL row to fill (joined with Jobsets),
/// which with none left reads all of it: longer than the rounds' statement_timeout at
/// tens of millions of builds. That search runs without the limit: here, in a rerun
/// after a finished backfill, it waits out a lock on Jobsets (as a long scan takes its
/// time) past a 100 ms statement_timeout, and the rerun ends well.
#[test]
fn the_search_for_rows_to_fill_is_not_cut_off_by_the_rounds_statement_timeout() {
    let db = hydra_at(61);
    let mut conn = db.connect();
    backfill_on(&mut conn, |_| {}).unwrap();
    let mut holder = db.connect();
    holder
        .client()
        .batch_execute("BEGIN; LOCK TABLE jobsets IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        holder.client().batch_execute("COMMIT").unwrap();
    });
    let rerun = backfill_on(&mut conn, |o| {
        o.statement_timeout = Duration::from_millis(100)
    });
    release.join().unwrap();
    rerun.expect("the rerun's search for NULL rows was cut off by the 100 ms statement_timeout");
}

/// A round cut off by our statement_timeout is halved and tried again, and the walk goes
/// on. Here the round waits for Builds' SHARE lock (what a plain `CREATE INDEX`, as in
/// hydra-init's upgrade-64, holds while it builds), with a lock_timeout longer than the
/// statement_timeout, so the statement timeout is what ends the wait; once the halving
/// is reported the lock is let go, and the run finishes. (Rounds no longer wait for row
/// locks: they skip held rows.)
#[test]
fn a_round_cut_off_by_the_statement_timeout_is_halved_and_the_walk_goes_on() {
    use std::io::BufRead;
    let db = hydra_at(61);
    let reader = bare_command(&[
        "--db",
        db.dsn.as_str(),
        "backfill",
        "--strategy",
        "per-page",
        "--batch-size",
        "16",
        "--max-batch-size",
        "16",
        "--pause-ms",
        "4",
        "--lock-timeout-ms",
        "30000",
        "--statement-timeout-ms",
        "1000",
    ])
    .stderr_to_stdout()
    .reader()
    .unwrap();
    // Once the walk of Builds is under way (its statements prepared), the lock is taken
    // between two rounds, and let go when the halving is reported.
    let (release, released_rx) = std::sync::mpsc::channel::<()>();
    let mut holder = db.connect();
    let locker = std::thread::spawn(move || {
        let c = holder.client();
        wait_for("the walk to start", || {
            c.query_one(BUILDS_STARTED, &[]).unwrap().get::<_, bool>(0)
        });
        c.batch_execute("BEGIN; LOCK TABLE builds IN SHARE MODE")
            .unwrap();
        let _ = released_rx.recv();
        c.batch_execute("COMMIT").unwrap();
    });
    let mut said = String::new();
    let mut released = false;
    for line in std::io::BufReader::new(&reader).lines() {
        let line = line.unwrap();
        if !released && line.contains("statement timeout, batch halved to ") {
            release.send(()).unwrap();
            released = true;
        }
        said.push_str(&line);
        said.push('\n');
    }
    let status = reader.try_wait().unwrap().expect("the run ended").status;
    drop(release);
    locker.join().unwrap();
    assert!(released, "no halving reported:\n{said}");
    assert_eq!(status.code(), Some(0), "{said}");
    assert_eq!(db.wrong_or_null(), 0);
}
