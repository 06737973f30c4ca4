//! status, plan and the refusals of phase detection, through the real binary.

mod common;
use common::*;

#[test]
fn status_before_migration_names_the_next_step() {
    let db = hydra_at(57);
    let r = run_on(&db, &["status"]);
    r.expect_code(0);
    assert_contains(&r.stdout, "schema version:    57");
    assert_contains(&r.stdout, "next: switch to the migration package");

    let j = run_on(&db, &["status", "--json"]).json();
    assert_eq!(j["schema_version"], 57);
    assert_eq!(j["stage"], "before_migration");
    assert_eq!(j["jobs_jobset_id"]["exists"], false);
}

#[test]
fn status_at_61_counts_null_rows_and_json_agrees() {
    let db = hydra_at(61);
    let j = run_on(&db, &["status", "--json", "--exact"])
        .expect_code(0)
        .json();
    assert_eq!(j["stage"], "migration");
    assert_eq!(j["builds_jobset_id"]["nullable"], true);
    assert_eq!(j["builds_jobset_id"]["null_rows"], SPEC.builds);
    assert_eq!(
        j["jobs_jobset_id"]["null_rows"],
        db.query_i64("SELECT count(*) FROM jobs")
    );
    assert!(j["next_step"].as_str().unwrap().contains("backfill"));
}

#[test]
fn status_samples_a_large_builds_and_counts_exactly_when_the_sample_sees_no_null() {
    let db = hydra_at(61);
    // Past the 64 MB heap that switches status to a page sample: two more copies of the
    // builds at fillfactor 10 (about three rows a page).
    db.exec(
        "CREATE TEMP TABLE more AS SELECT * FROM builds;
         ALTER TABLE builds SET (fillfactor = 10);
         UPDATE more SET id = id + 1000000; INSERT INTO builds SELECT * FROM more;
         UPDATE more SET id = id + 1000000; INSERT INTO builds SELECT * FROM more;",
    );
    db.exec("ANALYZE builds");
    assert!(db.query_i64("SELECT pg_relation_size('builds')") > 64 << 20);
    let rows = db.query_i64("SELECT count(*) FROM builds");
    assert_eq!(rows as u64, 3 * SPEC.builds);

    // Every row NULL: the sample's share (all) times the planner's row count.
    let j = run_on(&db, &["status", "--json"]).expect_code(0).json();
    assert_eq!(j["builds_jobset_id"]["exact"], false, "{j}");
    let estimate = j["builds_jobset_id"]["null_rows"].as_i64().unwrap();
    assert!(
        (estimate - rows).abs() * 10 < rows,
        "estimate {estimate} of {rows}"
    );
    // plan and the next step give it as what it is.
    assert_contains(j["next_step"].as_str().unwrap(), "(about ");
    let plan = run_on(&db, &["plan"]);
    let plan = &plan.expect_code(0).stdout;
    assert!(
        plan.contains("online (about ") && plan.contains(" NULL rows now)"),
        "{plan}"
    );
    let j = run_on(&db, &["status", "--json", "--exact"])
        .expect_code(0)
        .json();
    assert_eq!(j["builds_jobset_id"]["exact"], true);
    assert_eq!(j["builds_jobset_id"]["null_rows"], rows);

    // None left: a sample that sees none cannot tell none from a few, so status counts.
    db.exec(&fill_builds_where("true"));
    let j = run_on(&db, &["status", "--json"]).expect_code(0).json();
    assert_eq!(j["builds_jobset_id"]["exact"], true, "{j}");
    assert_eq!(j["builds_jobset_id"]["null_rows"], 0);
}

#[test]
fn status_names_autoanalyze_left_held_off_by_a_killed_backfill() {
    let db = hydra_at(61);
    // As a backfill killed with SIGKILL during its walk leaves it.
    db.exec("ALTER TABLE builds SET (autovacuum_analyze_threshold = 2000000000)");
    let r = run_on(&db, &["status"]);
    r.expect_code(0);
    assert_contains(
        &r.stdout,
        "autoanalyze of builds held off by hydra-upgrade; a backfill was killed: \
             the next backfill or finalize resets it",
    );
    let j = run_on(&db, &["status", "--json"]).expect_code(0).json();
    assert_eq!(j["autoanalyze_held_off"], serde_json::json!(["builds"]));
    run_on(&db, &["backfill"]).expect_code(0);
    let j = run_on(&db, &["status", "--json"]).expect_code(0).json();
    assert_eq!(j["autoanalyze_held_off"], serde_json::json!([]));
}

#[test]
fn plan_prints_the_steps_and_changes_nothing() {
    let db = hydra_at(57);
    let before = db.digest_without_jobset_id();
    let r = run_on(&db, &["plan"]);
    r.expect_code(0);
    for step in [
        "switch-migration",
        "backfill",
        "verify",
        "finalize",
        "switch-final",
    ] {
        assert!(r.stdout.contains(step), "{step} missing:\n{}", r.stdout);
    }
    assert_eq!(db.version(), 57);
    assert_eq!(db.digest_without_jobset_id(), before);
}

/// A finalize that stopped after its `SET NOT NULL` leaves schema 61 with both columns
/// NOT NULL: `upgrade` then goes on with the finalize, and the plan says the same
/// (it listed a backfill and a verify that would not run).
#[test]
fn plan_leaves_out_the_backfill_once_both_columns_are_not_null() {
    let db = hydra_at(61);
    db.exec(&format!(
        "{};
         UPDATE jobs j SET jobset_id = js.id FROM jobsets js
          WHERE js.project = j.project AND js.name = j.jobset;
         ALTER TABLE jobs ALTER COLUMN jobset_id SET NOT NULL;
         ALTER TABLE builds ALTER COLUMN jobset_id SET NOT NULL",
        fill_builds_where("true")
    ));
    let r = run_on(&db, &["plan"]);
    r.expect_code(0);
    for step in ["finalize", "switch-final"] {
        assert_contains(&r.stdout, step);
    }
    for step in ["backfill", "verify"] {
        assert!(!r.stdout.contains(step), "{step} listed:\n{}", r.stdout);
    }
}

#[test]
fn a_database_that_is_not_hydra_is_refused() {
    let db = empty_db();
    let r = run_on(&db, &["status"]);
    r.expect_code(5);
    assert_contains(&r.stderr, "not a Hydra database");
}

#[test]
fn version_61_without_the_columns_is_a_contradiction() {
    let db = hydra_at(58);
    db.exec("UPDATE SchemaVersion SET version = 61");
    let r = run_on(&db, &["status"]);
    r.expect_code(6);
    assert_contains(&r.stderr, "contradicts SchemaVersion 61");
    assert_contains(&r.stderr, "Jobsets.id is missing");
    // backfill refuses the same way and changes nothing
    run_on(&db, &["backfill"]).expect_code(6);
    assert_eq!(db.version(), 61);
}

#[test]
fn a_column_ahead_of_the_version_is_a_contradiction() {
    let db = hydra_at(57);
    db.exec("ALTER TABLE builds ADD COLUMN jobset_id integer");
    run_on(&db, &["status"]).expect_code(6);
}

#[test]
fn final_and_later_schemas_have_nothing_to_do() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    db.upgrade_to(65);
    let r = run_on(&db, &["status"]);
    r.expect_code(0);
    assert_contains(&r.stdout, "nothing to do");
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    // With --json the last line is still a report (no table walked, no step taken).
    let (_, report) = run_on(&db, &["--json", "backfill"]).json_lines();
    assert_eq!(report["tables"], serde_json::json!([]));
    let (_, report) = run_on(&db, &["--json", "finalize"]).json_lines();
    assert_eq!(report["blocking_steps"], serde_json::json!([]));
    run_on(&db, &["verify"]).expect_code(0);
    // Schema 67 drops Jobs: every command still says there is nothing left to do.
    db.exec("DROP TABLE jobs CASCADE; UPDATE SchemaVersion SET version = 67");
    let r = run_on(&db, &["verify", "--json"]);
    r.expect_code(0);
    assert_eq!(r.json()["clean"], true);
    assert_eq!(r.json()["dropped"], serde_json::json!(["jobs"]));
    let r = run_on(&db, &["verify"]);
    r.expect_code(0);
    assert_contains(&r.stdout, "jobs: dropped by a later Hydra schema");
    run_on(&db, &["backfill"]).expect_code(0);
    run_on(&db, &["finalize"]).expect_code(0);
    db.exec("UPDATE SchemaVersion SET version = 80");
    let r = run_on(&db, &["upgrade", "--simulate-host", "--yes"]);
    r.expect_code(0);
    assert_eq!(db.version(), 80);
}

#[test]
fn backfill_before_migration_is_the_wrong_phase() {
    let db = hydra_at(57);
    let r = run_on(&db, &["backfill"]);
    r.expect_code(9);
    assert_contains(&r.stderr, "switch to the migration package first");
    run_on(&db, &["verify"]).expect_code(9);
}

#[test]
fn malformed_dbi_string_is_a_config_error() {
    let r = run(&["--db", "dbi:Pg:dbname=hydra;user", "status"]);
    r.expect_code(3);
    assert_contains(&r.stderr, "malformed DBI string");
    let r = run(&["--db", "dbi:SQLite:dbname=x", "status"]);
    r.expect_code(3);
}

#[test]
fn status_does_not_wait_behind_a_lock_on_builds_and_names_its_holder() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    let c = holder.client();
    // As hydra-init's upgrade-63 holds it for its whole SET NOT NULL scan.
    c.batch_execute("BEGIN; LOCK TABLE builds IN ACCESS EXCLUSIVE MODE;")
        .unwrap();
    let pid = holder.backend_pid().unwrap();
    let r = run_on(&db, &["status"]);
    r.expect_code(0);
    assert_contains(&r.stdout, "NULL rows not counted (table locked)");
    assert_contains(&r.stdout, &format!("locked by:         builds: pid {pid}"));
    let j = run_on(&db, &["status", "--json"]).json();
    assert!(j["builds_jobset_id"]["null_rows"].is_null(), "{j}");
    assert!(
        j["jobs_jobset_id"]["null_rows"].as_i64().unwrap() > 0,
        "{j}"
    );
    assert_eq!(j["counts_blocked_by"].as_array().unwrap().len(), 1, "{j}");
    holder.client().batch_execute("COMMIT").unwrap();
    let j = run_on(&db, &["status", "--json"]).json();
    assert!(
        j["builds_jobset_id"]["null_rows"].as_i64().unwrap() > 0,
        "{j}"
    );
    assert_eq!(j["counts_blocked_by"], serde_json::json!([]));
}

#[test]
fn with_json_a_failure_ends_in_an_error_line() {
    let r = run(&["--json", "--db", "host=/nonexistent dbname=hydra", "status"]);
    r.expect_code(4);
    let (_, last) = r.json_lines();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit"], 4);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the database"),
        "{last}"
    );
}

#[test]
fn an_empty_hydra_upgrade_config_counts_as_unset() {
    let db = hydra_at(57);
    let out = duct::cmd(BIN, ["--db", &db.dsn, "status"])
        .env("HYDRA_UPGRADE_CONFIG", "")
        .env_remove("HYDRA_DBI")
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_database_given_is_a_config_error() {
    let r = run(&["status"]);
    r.expect_code(3);
    assert_contains(&r.stderr, "HYDRA_DBI");
}

#[test]
fn hydra_dbi_from_the_environment_is_used() {
    let db = hydra_at(57);
    let dbi = format!(
        "dbi:Pg:dbname={};user=postgres;host={};port=5432",
        db.name,
        cluster().socket_dir().display()
    );
    let out = duct::cmd(BIN, ["status", "--json"])
        .env("HYDRA_DBI", dbi)
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["schema_version"], 57);
}

#[test]
fn unreachable_server_is_a_connect_error() {
    let r = run(&[
        "--db",
        "host=/nonexistent-socket-dir port=5999 dbname=hydra user=hydra",
        "status",
    ]);
    r.expect_code(4);
    assert_contains(&r.stderr, "cannot connect");
}

#[test]
fn wrong_password_is_refused_and_never_echoed() {
    let c = cluster();
    let db = hydra_at(57);
    {
        let mut admin = c.connect("postgres").unwrap();
        admin
            .client()
            .batch_execute("SET password_encryption = 'scram-sha-256'; DO $$ BEGIN CREATE ROLE pwuser LOGIN PASSWORD 'right-password'; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            .unwrap();
    }
    db.exec("GRANT SELECT ON ALL TABLES IN SCHEMA public TO pwuser");
    c.prepend_hba("local all pwuser scram-sha-256").unwrap();
    let secret = "Wr0ng-S3cret-Value";
    let dsn = format!(
        "dbi:Pg:dbname={};user=pwuser;host={};password={secret}",
        db.name,
        c.socket_dir().display()
    );
    let r = run(&["--db", &dsn, "status"]);
    r.expect_code(4);
    assert_contains(&r.stderr, "password authentication failed");
    assert!(
        !r.stderr.contains(secret) && !r.stdout.contains(secret),
        "password echoed:\n{}",
        r.stderr
    );

    // the same password through PGPASSWORD: refused, never echoed
    let dsn = format!(
        "host={} dbname={} user=pwuser",
        c.socket_dir().display(),
        db.name
    );
    let out = duct::cmd(BIN, ["--db", &dsn, "status"])
        .env("PGPASSWORD", secret)
        .stderr_capture()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));

    // and the right one through a pgpass file works
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    std::fs::write(
        &pgpass,
        format!("localhost:5432:{}:pwuser:right-password\n", db.name),
    )
    .unwrap();
    let out = duct::cmd(BIN, ["--db", &dsn, "status"])
        .env("PGPASSFILE", &pgpass)
        .env_remove("PGPASSWORD")
        .stderr_capture()
        .stdout_capture()
        .unchecked()
        .run()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reader queues behind a waiting ACCESS EXCLUSIVE request too: hydra-init's ALTER
/// TABLE waiting behind a long Hydra transaction keeps `status` from counting as well.
/// The waiting session is named, with the one it waits behind.
#[test]
fn status_names_a_queued_lock_request_and_the_session_it_waits_behind() {
    let db = hydra_at(61);
    let mut hydra = db.connect();
    hydra
        .client()
        .batch_execute("BEGIN; UPDATE builds SET priority = priority WHERE id = 1")
        .unwrap();
    let hydra_pid = hydra.backend_pid().unwrap();
    let mut init = db.connect();
    let init_pid = init.backend_pid().unwrap();
    let waiter = std::thread::spawn(move || {
        init.client()
            .batch_execute("BEGIN; LOCK TABLE builds IN ACCESS EXCLUSIVE MODE; COMMIT")
            .unwrap();
    });
    wait_for("the lock request to queue", || {
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_locks WHERE pid = {init_pid} AND NOT granted"
        )) > 0
    });
    let r = run_on(&db, &["status"]);
    hydra.client().batch_execute("COMMIT").unwrap();
    waiter.join().unwrap();
    r.expect_code(0);
    assert_contains(&r.stdout, "NULL rows not counted (table locked)");
    assert_contains(
        &r.stdout,
        &format!("locked by:         builds: pid {init_pid} "),
    );
    assert_contains(
        &r.stdout,
        &format!("waits for its lock behind pid {hydra_pid},"),
    );
    assert_contains(&r.stdout, "or waits for one");
}
