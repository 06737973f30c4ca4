//! A streaming standby that falls behind: the backfill waits for it, and says when the
//! role it connects as cannot see how far behind it is. In its own test binary (its own
//! cluster): a standby follows every database of the cluster.
mod common;

use std::io::BufRead;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use hydra_upgrade::pg_cluster::PgCluster;
use serde_json::Value;

/// The cluster's standby, streaming, kept for the binary's run.
fn standby() -> &'static PgCluster {
    static STANDBY: OnceLock<&'static PgCluster> = OnceLock::new();
    STANDBY.get_or_init(|| {
        let s = cluster().start_standby().expect("starting a standby");
        s.share_until_exit(std::process::id())
            .expect("watching the test process")
    })
}

/// Wait until the standby has stored all the WAL written so far: until its receiver's
/// first reply the walsender shows no flush position at all.
fn standby_caught_up() {
    standby();
    let mut primary = cluster().connect("postgres").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !primary
        .client()
        .query_one(
            "SELECT coalesce(bool_and(flush_lsn >= pg_current_wal_lsn()), false)
               FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(Instant::now() < deadline, "the standby never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The standby's WAL receiver process: while it is stopped (SIGSTOP) it stays connected
/// and stores nothing, as a standby on a slow disk or link would.
fn receiver_pid() -> String {
    let mut s = standby().connect("postgres").unwrap();
    let pid: i32 = s
        .client()
        .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
        .unwrap()
        .get(0);
    pid.to_string()
}

fn signal(pid: &str, sig: &str) {
    duct::cmd("kill", [sig, pid]).run().expect("kill");
}

fn nulls(db: &TestDb) -> i64 {
    db.query_i64(
        "SELECT (SELECT count(*) FROM builds WHERE jobset_id IS NULL)
              + (SELECT count(*) FROM jobs WHERE jobset_id IS NULL)",
    )
}

fn table_waited(report: &Value, table: &str) -> f64 {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("no {table} in {report}"))["replication_wait_seconds"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_standby_far_behind_holds_the_backfill_until_it_has_caught_up() {
    let db = hydra_at(61);
    let before = nulls(&db);
    standby_caught_up();
    let receiver = receiver_pid();
    signal(&receiver, "-STOP");
    // 3 MB of WAL the standby does not store (committed, so written at once).
    db.exec("SELECT pg_logical_emit_message(true, 'hydra-upgrade-test', repeat('x', 3145728))");
    let reader = bare_command(&[
        "--db",
        &db.dsn,
        "--json",
        "backfill",
        "--max-replication-lag-mb",
        "1",
    ])
    .stderr_capture()
    .reader()
    .unwrap();
    let mut lines = std::io::BufReader::new(&reader).lines();
    let mut seen = Vec::new();
    let wait = loop {
        let Some(line) = lines.next() else {
            signal(&receiver, "-CONT");
            panic!("the backfill ended without waiting for the standby:\n{seen:#?}");
        };
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if event["event"] == "replication-wait" {
            break event;
        }
        seen.push(event);
    };
    assert_eq!(wait["receiver"], "walreceiver", "{wait}");
    assert!(wait["behind_bytes"].as_i64().unwrap() > 3_000_000, "{wait}");
    // While it waits, nothing is written, and it keeps waiting.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nulls(&db), before);
    assert!(reader.try_wait().unwrap().is_none(), "the backfill ended");
    signal(&receiver, "-CONT");
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let caught_up = rest
        .iter()
        .find(|e| e["event"] == "replication-caught-up")
        .unwrap_or_else(|| panic!("no catching up in {rest:#?}"));
    assert!(
        caught_up["behind_bytes"].as_i64().unwrap() <= 512 * 1024,
        "{caught_up}"
    );
    let out = reader.try_wait().unwrap().expect("the backfill has ended");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(db.wrong_or_null(), 0);
    // The wait began before the first batch of Jobs, the first table.
    let report = rest.last().unwrap();
    assert!(table_waited(report, "jobs") >= 2.0, "{report}");
}

#[test]
fn a_role_that_cannot_see_the_standby_is_told_what_to_grant() {
    let db = hydra_at(61);
    standby_caught_up();
    // Hydra's own role on NixOS: owns its database and tables, no superuser, not a
    // member of pg_read_all_stats.
    db.exec(&format!(
        "DO $$ BEGIN CREATE ROLE hu_owner LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         ALTER DATABASE {} OWNER TO hu_owner;
         DO $$ DECLARE t text; BEGIN
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
             EXECUTE format('ALTER TABLE %I OWNER TO hu_owner', t);
           END LOOP;
         END $$",
        db.name
    ));
    let dsn = cluster().dsn_string(&db.name, "hu_owner");
    let plan = run(&["--db", &dsn, "plan"]);
    plan.expect_code(0);
    assert_contains(
        &plan.stdout,
        "replication: 1 walsender(s) this role cannot see into (GRANT pg_read_all_stats",
    );
    let r = run(&["--db", &dsn, "backfill"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "GRANT pg_read_all_stats");
    assert!(!r.stderr.contains("streaming to"), "{}", r.stderr);
    assert_eq!(db.wrong_or_null(), 0);

    // With the grant it sees the standby (and waits for nothing: it keeps up).
    let again = hydra_at(61);
    again.exec(&format!(
        "ALTER DATABASE {} OWNER TO hu_owner;
         DO $$ DECLARE t text; BEGIN
           FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
             EXECUTE format('ALTER TABLE %I OWNER TO hu_owner', t);
           END LOOP;
         END $$;
         GRANT pg_read_all_stats TO hu_owner",
        again.name
    ));
    let dsn = cluster().dsn_string(&again.name, "hu_owner");
    let plan = run(&["--db", &dsn, "--json", "plan"]);
    plan.expect_code(0);
    let seen = &plan.json()["replication"];
    assert_eq!(seen["hidden"], 0, "{seen}");
    assert_eq!(seen["limit_mb"], 512, "{seen}");
    assert_eq!(seen["receivers"][0]["name"], "walreceiver", "{seen}");
    let r = run(&["--db", &dsn, "backfill"]);
    r.expect_code(0);
    assert!(!r.stderr.contains("pg_read_all_stats"), "{}", r.stderr);
    assert_contains(&r.stderr, "streaming to walreceiver");
    assert_eq!(again.wrong_or_null(), 0);
    // Nothing left to backfill: nothing to say about replication.
    assert_eq!(
        run(&["--db", &dsn, "--json", "plan"]).json()["replication"],
        Value::Null
    );
}
