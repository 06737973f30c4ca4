//! `hydra-upgrade wal prepare` readies the WAL segments the backfill writes into and keeps
//! checkpoints out of its walk; `wal reset` puts back exactly what it changed
//! (src/wal_prepare.rs). On a cluster of its own: both change server settings.

mod common;

use common::*;
use hydra_upgrade::hydra_schema;
use hydra_upgrade::pg_cluster::{PgCluster, SUPERUSER};
use hydra_upgrade::synth;
use hydra_upgrade::wal_prepare::RECORD;
use serde_json::Value;

/// A cluster that keeps the fewest segments PostgreSQL allows (two for `min_wal_size`,
/// three for `max_wal_size`): of 1 MB from PostgreSQL 11 on (`initdb --wal-segsize`, which
/// 10 lacks: 16 MB there), with a Hydra database of 24,000 builds (Builds about 26 MB)
/// before the migration package (`walprep57`, schema 57) and one after it (`walprep`,
/// schema 61).
fn small_wal_cluster() -> (PgCluster, i64) {
    let version = cluster()
        .connect("postgres")
        .unwrap()
        .server_version()
        .unwrap();
    let (initdb, segment_mb): (&[&str], i64) = if version >= 110_000 {
        (&["--wal-segsize=1"], 1)
    } else {
        (&[], 16)
    };
    let min = format!("min_wal_size={}MB", 2 * segment_mb);
    let max = format!("max_wal_size={}MB", 3 * segment_mb);
    let cluster = PgCluster::start_with(initdb, &["fsync=off", &min, &max]).expect("a cluster");
    cluster.create_database("walprep57", None).unwrap();
    synth::generate(
        &mut cluster.connect("walprep57").unwrap(),
        &synth::Spec {
            builds: 24_000,
            ..SPEC
        },
    )
    .unwrap();
    cluster
        .create_database("walprep", Some("walprep57"))
        .unwrap();
    hydra_schema::apply_steps(&mut cluster.connect("walprep").unwrap(), 61).unwrap();
    (cluster, segment_mb)
}

/// Jobs' and Builds' sizes: the WAL their whole walks write, about.
fn walked_tables(cluster: &PgCluster, db: &str) -> i64 {
    cluster
        .connect(db)
        .unwrap()
        .client()
        .query_one(
            "SELECT (pg_total_relation_size('builds') + pg_total_relation_size('jobs'))::bigint",
            &[],
        )
        .unwrap()
        .get(0)
}

/// A setting in its `pg_settings` unit (MB, s).
fn setting(cluster: &PgCluster, name: &str) -> i64 {
    server_setting(cluster, name).parse().unwrap()
}

/// `postgresql.auto.conf`'s entries, as written there.
fn auto_conf(cluster: &PgCluster) -> Vec<(String, String)> {
    cluster
        .connect("postgres")
        .unwrap()
        .client()
        .query(
            "SELECT name, setting FROM pg_file_settings
              WHERE sourcefile LIKE '%postgresql.auto.conf' ORDER BY name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn tool(cluster: &PgCluster, db: &str, args: &[&str]) -> Run {
    let dsn = cluster.dsn_string(db, SUPERUSER);
    let mut argv = vec!["--db", dsn.as_str()];
    argv.extend_from_slice(args);
    run(&argv)
}

#[test]
fn prepare_readies_the_walk_and_reset_puts_back_what_it_changed() {
    let (cluster, segment_mb) = small_wal_cluster();
    // An admin's own setting in postgresql.auto.conf, which reset must give back.
    admin_sets(&cluster, "checkpoint_timeout", "7min", "420");
    let conf_min = setting(&cluster, "min_wal_size");
    let conf_max = setting(&cluster, "max_wal_size");

    // Before: the backfill would create most of its segments, with a checkpoint inside.
    let plan = tool(&cluster, "walprep", &["plan"]);
    plan.expect_code(0);
    assert_contains(&plan.stdout, "a checkpoint will be requested");

    let r = tool(
        &cluster,
        "walprep",
        &["--json", "wal", "prepare", "--pause-ms", "1"],
    );
    r.expect_code(0);
    let (events, report) = r.json_lines();
    let expected = report["expected_bytes"].as_i64().unwrap();
    let tables = walked_tables(&cluster, "walprep");
    assert_eq!(expected, tables, "{report}");
    let changed: Vec<&str> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["setting"].as_str().unwrap())
        .collect();
    // What is kept is whole segments: with PostgreSQL 10's 16 MB ones the fixture's walk
    // fits in the two that min_wal_size keeps at least, and it stays.
    let keep = report["keep_bytes"].as_i64().unwrap();
    let raises_min = keep > conf_min << 20;
    assert_eq!(raises_min, segment_mb == 1, "{report}");
    let mut all = vec!["max_wal_size", "checkpoint_timeout"];
    if raises_min {
        all.insert(0, "min_wal_size");
    }
    assert_eq!(changed, all, "{report}");
    assert!(
        events.iter().any(|e| e["event"] == "wal_settings"),
        "{}",
        r.stdout
    );
    // What pg_wal keeps and has ready now holds the walk's WAL.
    assert!(keep >= expected, "{report}");
    assert!(setting(&cluster, "min_wal_size") << 20 >= keep, "{report}");
    assert!(
        report["ready_after_bytes"].as_i64().unwrap() >= expected,
        "{report}"
    );
    assert_eq!(setting(&cluster, "checkpoint_timeout"), 1800);
    assert_eq!(report["warnings"], Value::Array(vec![]), "{report}");
    // The record: what was there before, and what was written.
    let auto = auto_conf(&cluster);
    let record = &auto.iter().find(|(n, _)| n == RECORD).expect("a record").1;
    let record: Value = serde_json::from_str(record).unwrap();
    assert_eq!(record["before"]["checkpoint_timeout"], "7min", "{record}");
    assert_eq!(record["before"]["max_wal_size"], Value::Null, "{record}");
    assert_eq!(record["set"]["checkpoint_timeout"], "1800s", "{record}");

    // Any role's `status` reminds of it.
    let status = tool(&cluster, "walprep", &["status"]);
    status.expect_code(0);
    assert_contains(&status.stdout, "raised by `hydra-upgrade wal prepare`");
    let plan = tool(&cluster, "walprep", &["plan"]);
    assert_contains(&plan.stdout, "raised by `hydra-upgrade wal prepare`");

    // The backfill then finds no segment to create and no checkpoint in its way.
    let b = tool(&cluster, "walprep", &["--json", "backfill"]);
    b.expect_code(0);
    let (events, _) = b.json_lines();
    let e = events
        .iter()
        .find(|e| e["event"] == "wal_segments")
        .expect("a wal_segments event");
    assert_eq!(e["segments_to_create"].as_i64(), Some(0), "{e}");
    assert_eq!(e["checkpoint_in_walk"], false, "{e}");
    assert!(
        !events.iter().any(|e| e["event"] == "warning"),
        "{}",
        b.stdout
    );

    let reset = tool(&cluster, "walprep", &["--json", "wal", "reset"]);
    reset.expect_code(0);
    let restored = &reset.json_lines().1["restored"];
    assert_eq!(restored.as_array().unwrap().len(), all.len(), "{restored}");
    wait_for_setting(&cluster, "checkpoint_timeout", "420");
    assert_eq!(setting(&cluster, "min_wal_size"), conf_min);
    assert_eq!(setting(&cluster, "max_wal_size"), conf_max);
    assert_eq!(
        auto_conf(&cluster),
        [("checkpoint_timeout".to_owned(), "7min".to_owned())]
    );
    assert!(
        !tool(&cluster, "walprep", &["status"])
            .stdout
            .contains("wal prepare"),
        "status still reminds of wal prepare"
    );
    let again = tool(&cluster, "walprep", &["wal", "reset"]);
    again.expect_code(0);
    assert_contains(&again.stderr, "nothing to reset");
    // With nothing left to backfill there is nothing to prepare.
    let nothing = tool(&cluster, "walprep", &["wal", "prepare"]);
    nothing.expect_code(0);
    assert_contains(&nothing.stderr, "nothing to prepare");
    assert_eq!(auto_conf(&cluster).len(), 1);
}

#[test]
fn before_the_migration_package_prepare_counts_whole_walks_and_reset_leaves_later_changes() {
    let (cluster, _) = small_wal_cluster();
    // Schema 57: no jobset_id column yet; the walks to come are whole.
    let r = tool(
        &cluster,
        "walprep57",
        &["--json", "wal", "prepare", "--pause-ms", "0"],
    );
    r.expect_code(0);
    let report = r.json_lines().1;
    let tables = walked_tables(&cluster, "walprep57");
    assert_eq!(report["expected_bytes"].as_i64(), Some(tables), "{report}");
    assert!(
        report["ready_after_bytes"].as_i64().unwrap() >= tables,
        "{report}"
    );
    let raised = setting(&cluster, "max_wal_size");
    // The admin raises max_wal_size further meanwhile.
    admin_sets(&cluster, "max_wal_size", "3GB", "3072");
    assert!(raised < 3072);
    let r = tool(&cluster, "walprep57", &["wal", "reset"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "max_wal_size was changed after `wal prepare`");
    wait_for_setting(&cluster, "checkpoint_timeout", "300");
    assert_eq!(setting(&cluster, "max_wal_size"), 3072);
    assert_eq!(
        auto_conf(&cluster),
        [("max_wal_size".to_owned(), "3GB".to_owned())]
    );
}

/// `prepare` writes its record first: stopped right after, the record names settings
/// still as they were, which `reset` finds so and passes over without a warning.
#[test]
fn reset_after_a_prepare_stopped_before_its_settings_changes_nothing_else() {
    let (cluster, _) = small_wal_cluster();
    admin_sets(&cluster, "checkpoint_timeout", "7min", "420");
    let record = r#"{"before":{"checkpoint_timeout":"7min","max_wal_size":null},"set":{"checkpoint_timeout":"1800s","max_wal_size":"999MB"}}"#;
    let mut db = cluster.connect("postgres").unwrap();
    for sql in [
        format!("SET {RECORD} = ''"),
        format!("ALTER SYSTEM SET {RECORD} = '{record}'"),
    ] {
        db.client().batch_execute(&sql).unwrap();
    }
    let r = tool(&cluster, "walprep", &["--json", "wal", "reset"]);
    r.expect_code(0);
    let (events, report) = r.json_lines();
    assert_eq!(report["restored"], Value::Array(vec![]), "{report}");
    assert_eq!(report["left"], Value::Array(vec![]), "{report}");
    assert!(
        !events.iter().any(|e| e["event"] == "warning"),
        "{}",
        r.stdout
    );
    assert_eq!(
        auto_conf(&cluster),
        [("checkpoint_timeout".to_owned(), "7min".to_owned())]
    );
}

#[test]
fn prepare_and_reset_need_a_superuser() {
    let db = hydra_at(61);
    db.exec(
        "DO $$ BEGIN CREATE ROLE hu_plain LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    let dsn = cluster().dsn_string(&db.name, "hu_plain");
    for action in ["prepare", "reset"] {
        let r = run(&["--db", &dsn, "wal", action]);
        r.expect_code(16);
        assert_contains(&r.stderr, "needs a PostgreSQL superuser");
        assert_contains(&r.stderr, "sudo -u postgres hydra-upgrade wal");
    }
}
