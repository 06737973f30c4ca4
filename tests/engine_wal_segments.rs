//! Before walking Builds, the backfill says how much WAL is coming and how much room
//! `pg_wal` has for it, and warns when PostgreSQL will zero-fill new segments while
//! Hydra's commits wait (src/backfill/wal_segments.rs).

mod common;

use common::*;
use hydra_upgrade::backfill::wal_segments;
use hydra_upgrade::hydra_schema;
use hydra_upgrade::pg_cluster::{PgCluster, SUPERUSER};
use hydra_upgrade::synth;
use serde_json::Value;

/// The `wal_segments` event of a `--json backfill` run, and whether a warning about new
/// segments came with it.
fn wal_event(r: &Run) -> (Value, bool) {
    let (events, _) = r.json_lines();
    let event = events
        .iter()
        .find(|e| e["event"] == "wal_segments")
        .unwrap_or_else(|| panic!("no wal_segments event:\n{}", r.stdout))
        .clone();
    let warned = events.iter().any(|e| {
        e["event"] == "warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("new WAL segments"))
    });
    (event, warned)
}

#[test]
fn a_small_walk_gets_the_figures_and_no_warning() {
    let db = hydra_at(61);
    let size = db.query_i64("SELECT pg_total_relation_size('builds')");
    let r = run_on(&db, &["--json", "backfill"]);
    r.expect_code(0);
    let (e, warned) = wal_event(&r);
    assert_eq!(e["table"], "builds");
    assert_eq!(e["expected_bytes"].as_i64(), Some(size), "{e}");
    let segment = e["segment_bytes"].as_i64().unwrap();
    assert_eq!(segment, 16 << 20, "{e}");
    let ready = e["ready_bytes"].as_i64().unwrap();
    // At least the rest of the segment being written; whole segments beyond it.
    assert!(ready > 0, "{e}");
    assert!(
        ready - e["segments_ahead"].as_i64().unwrap() * segment <= segment,
        "{e}"
    );
    assert_eq!(e["zero_filled"], true, "{e}");
    // The fixture's Builds (13 MB) needs at most one new segment, not worth a warning.
    assert!(e["segments_to_create"].as_i64().unwrap() <= 1, "{e}");
    assert!(!warned, "{}", r.stdout);
    // max_wal_size 1 GB over 1 + checkpoint_completion_target (0.9 from PostgreSQL 14,
    // 0.5 before), over 2 + it before 11: a checkpoint after 410-683 MiB, far beyond this
    // walk.
    let after = e["checkpoint_after_bytes"].as_i64().unwrap();
    assert!((409 << 20..=683 << 20).contains(&after), "{e}");
    assert_eq!(e["checkpoint_in_walk"], false, "{e}");
    assert!(
        !r.stdout.contains("a checkpoint will be requested"),
        "{}",
        r.stdout
    );
    assert_eq!(db.wrong_or_null(), 0);
}

/// A cluster of 1 MB segments that keeps at most a few (`max_wal_size = 4MB`) and, from
/// PostgreSQL 12 on, recycles none (`wal_recycle = off`): Builds of 24,000 builds (about
/// 26 MB) needs more new segments than the warning's threshold.
#[test]
fn too_few_segments_ready_are_warned_about_unless_they_are_not_zero_filled() {
    let version = cluster()
        .connect("postgres")
        .unwrap()
        .server_version()
        .unwrap();
    if version < 110_000 {
        // initdb --wal-segsize came with PostgreSQL 11: with 16 MB segments the fixture
        // would have to be 200 MB. What 10 can show: the figures, always zero-filled.
        eprintln!("PostgreSQL 10: only the figures are checked (no --wal-segsize)");
        let db = hydra_at(61);
        let r = run_on(&db, &["--json", "backfill"]);
        r.expect_code(0);
        let (e, _) = wal_event(&r);
        assert_eq!(e["zero_filled"], true, "{e}");
        assert_eq!(e["segment_bytes"].as_i64(), Some(16 << 20), "{e}");
        return;
    }
    let mut settings = vec!["fsync=off", "min_wal_size=2MB", "max_wal_size=4MB"];
    if version >= 120_000 {
        settings.push("wal_recycle=off");
    }
    let cluster = PgCluster::start_with(&["--wal-segsize=1"], &settings).expect("a second cluster");
    cluster.create_database("walseg", None).unwrap();
    {
        let mut db = cluster.connect("walseg").unwrap();
        synth::generate(
            &mut db,
            &synth::Spec {
                builds: 24_000,
                ..SPEC
            },
        )
        .unwrap();
        hydra_schema::apply_steps(&mut db, 61).unwrap();
    }
    cluster.create_database("walseg2", Some("walseg")).unwrap();

    let backfill_on = |name: &str| {
        let dsn = cluster.dsn_string(name, SUPERUSER);
        let r = run(&["--db", &dsn, "--json", "backfill"]);
        r.expect_code(0);
        r
    };
    // `plan` says it before anything is done.
    let dsn = cluster.dsn_string("walseg", SUPERUSER);
    let plan = run(&["--db", &dsn, "plan"]);
    plan.expect_code(0);
    assert_contains(&plan.stdout, "backfill's WAL: builds: about");
    assert_contains(
        &plan.stdout,
        "warning: builds: PostgreSQL will create up to",
    );
    assert_contains(
        &plan.stdout,
        "warning: builds: a checkpoint will be requested",
    );
    let r = backfill_on("walseg");
    let (e, warned) = wal_event(&r);
    assert_eq!(e["segment_bytes"].as_i64(), Some(1 << 20), "{e}");
    // One preallocated at most; before 12, a few recycled too, within max_wal_size.
    let most_ahead = if version >= 120_000 { 1 } else { 4 };
    assert!(e["segments_ahead"].as_i64().unwrap() <= most_ahead, "{e}");
    assert!(
        e["segments_to_create"].as_i64().unwrap() >= wal_segments::MANY_NEW_SEGMENTS,
        "{e}"
    );
    assert!(warned, "no warning:\n{}", r.stdout);
    assert_contains(&r.stdout, "wal_init_zero = off");
    // max_wal_size 4 MB: a checkpoint after about 2 MB of the walk's 26.
    assert_eq!(e["checkpoint_in_walk"], true, "{e}");
    assert_contains(&r.stdout, "a checkpoint will be requested during the walk");
    if version < 120_000 {
        // wal_init_zero came with PostgreSQL 12; before, new segments are always
        // zero-filled.
        assert_eq!(e["zero_filled"], true, "{e}");
        return;
    }

    // The same with new segments not zero-filled: the figures, no warning.
    admin_sets(&cluster, "wal_init_zero", "off", "off");
    let r = backfill_on("walseg2");
    let (e, warned) = wal_event(&r);
    assert!(
        e["segments_to_create"].as_i64().unwrap() >= wal_segments::MANY_NEW_SEGMENTS,
        "{e}"
    );
    assert_eq!(e["zero_filled"], false, "{e}");
    assert!(!warned, "{}", r.stdout);
}

#[test]
fn plan_tells_the_same_before_the_backfill_and_nothing_after_it() {
    let db = hydra_at(61);
    let size = db.query_i64("SELECT pg_total_relation_size('builds')");
    let plan = run_on(&db, &["--json", "plan"]);
    plan.expect_code(0);
    let e = &plan.json()["wal_segments"];
    assert_eq!(e["table"], "builds", "{e}");
    assert_eq!(e["expected_bytes"].as_i64(), Some(size), "{e}");
    assert!(e["ready_bytes"].as_i64().unwrap() > 0, "{e}");
    let text = run_on(&db, &["plan"]);
    text.expect_code(0);
    assert_contains(&text.stdout, "backfill's WAL: builds: about");

    run_on(&db, &["backfill"]).expect_code(0);
    let plan = run_on(&db, &["--json", "plan"]);
    plan.expect_code(0);
    assert_eq!(plan.json()["wal_segments"], Value::Null, "{}", plan.stdout);
    assert!(!run_on(&db, &["plan"]).stdout.contains("backfill's WAL"));
}

#[test]
fn a_role_that_may_not_look_into_pg_wal_still_backfills() {
    let db = hydra_at(61);
    // Hydra's own role on NixOS: no pg_monitor.
    let dsn = owned_by_hydra_role(&db);
    let plan = run(&["--db", &dsn, "plan"]);
    plan.expect_code(0);
    assert_contains(&plan.stdout, "needs superuser or the pg_monitor role");
    let r = run(&["--db", &dsn, "--json", "backfill"]);
    r.expect_code(0);
    let (e, warned) = wal_event(&r);
    assert_eq!(e["ready_bytes"], Value::Null, "{e}");
    assert_contains(e["message"].as_str().unwrap(), "pg_monitor");
    assert!(!warned, "{}", r.stdout);
    assert_eq!(db.wrong_or_null(), 0);
}

/// The bench's `--wal-dir`: a cluster whose `pg_wal` lives in a directory of its own
/// (initdb's `--waldir`) writes its WAL there and leaves nothing behind.
#[test]
fn a_cluster_keeps_its_wal_where_it_is_told_and_removes_it_after() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::Builder::new()
        .prefix("hu-waldir-test.")
        .tempdir()
        .unwrap();
    // Enterable by the server account when the tests run as root.
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let cluster = PgCluster::start_with_wal_in(parent.path(), &["fsync=off"]).expect("a cluster");
    let (data, wal) = cluster.storage();
    let parent_real = std::fs::canonicalize(parent.path()).unwrap();
    assert!(wal.starts_with(&parent_real), "{}", wal.display());
    assert!(!data.starts_with(&parent_real), "{}", data.display());
    let mut db = cluster.connect("postgres").unwrap();
    let before: String = db
        .client()
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .unwrap()
        .get(0);
    db.client()
        .batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g; CHECKPOINT")
        .unwrap();
    assert!(
        wal.join(&before).is_file(),
        "{before} not in {}",
        wal.display()
    );
    drop(db);
    drop(cluster);
    let left: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
