//! The online final phase (catalog identical to Hydra's own upgrade-62..65), rehearse
//! end to end, and the whole flow on the simulated host.

mod common;
use std::time::Duration;

use common::*;
use hydra_upgrade::db::Db;
use hydra_upgrade::pg_cluster::SUPERUSER;

fn schema_dump(db: &TestDb) -> String {
    let c = cluster();
    let out = c
        .client_tool("pg_dump")
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "-n",
            "public",
            "-d",
        ])
        .arg(c.dsn_string(&db.name, SUPERUSER))
        .run()
        .expect("pg_dump");
    // pg_dump's \restrict lines carry a random key per run.
    out.stdout
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn finalize_produces_the_catalog_of_hydras_own_upgrade_files() {
    let stock = hydra_at(61);
    run_on(&stock, &["backfill"]).expect_code(0);
    stock.upgrade_to(65);

    let ours = hydra_at(61);
    run_on(&ours, &["backfill"]).expect_code(0);
    // As a backfill killed outright leaves it: autoanalyze held off. Finalize resets it.
    ours.exec("ALTER TABLE builds SET (autovacuum_analyze_threshold = 2000000000)");
    let r = run_on(&ours, &["finalize"]);
    r.expect_code(0);
    assert_contains(&r.stdout, "schema is 65");
    assert_eq!(ours.version(), 65);
    // What finalize says about SET NOT NULL's scan matches the server (.ci/older-postgres).
    let scans = ours.connect().server_version().unwrap() < 120_000;
    let said = format!("{}{}", r.stdout, r.stderr);
    assert_eq!(said.contains("older than 12"), scans, "{said}");
    assert_eq!(
        said.contains("under its lock: PostgreSQL < 12"),
        scans,
        "{said}"
    );
    assert_eq!(
        said.contains("no scan: the check proves it"),
        !scans,
        "{said}"
    );

    let (a, b) = (schema_dump(&stock), schema_dump(&ours));
    assert!(
        a.contains("indexfinishedsuccessfulbuilds") && a.contains("jobset_id integer NOT NULL")
    );
    assert_eq!(
        a.lines().count(),
        b.lines().count(),
        "catalog dumps differ in length:\n{a}\n----\n{b}"
    );
    if a != b {
        let diff: Vec<String> = a
            .lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .take(10)
            .map(|(x, y)| format!("stock: {x}\nours:  {y}"))
            .collect();
        panic!("catalogs differ:\n{}", diff.join("\n"));
    }
    assert_eq!(
        ours.query_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'hydra_upgrade'"),
        0,
        "no helper left"
    );
    assert_eq!(
        ours.query_i64("SELECT count(*) FROM pg_constraint WHERE conname LIKE 'hydra_upgrade%'"),
        0,
        "helper constraints dropped"
    );
    // the final package's hydra-init then has nothing left to do
    assert!(
        hydra_upgrade::hydra_schema::apply_steps(&mut ours.connect(), 65)
            .unwrap()
            .is_empty()
    );
    run_on(&ours, &["status"]).expect_code(0);
}

#[test]
fn finalize_is_refused_while_null_rows_remain() {
    let db = hydra_at(61);
    let r = run_on(&db, &["finalize"]);
    r.expect_code(7);
    assert_contains(&r.stderr, "finalize is refused while rows are left: jobs:");
    assert_eq!(db.version(), 61);
    assert_eq!(
        db.query_i64("SELECT count(*) FROM pg_constraint WHERE conname LIKE 'hydra_upgrade%'"),
        0
    );
}

#[test]
fn finalize_names_the_stage_and_a_running_backfill() {
    let db = hydra_at(57);
    let r = run_on(&db, &["finalize"]);
    r.expect_code(9);
    assert_contains(&r.stderr, "at schema 57");
    assert_contains(&r.stderr, "switch to the migration package");
    // A backfill at work (its advisory lock held) with rows still NULL: finalize says
    // who is working (exit 8) rather than what is left (exit 7).
    let db = hydra_at(61);
    let mut backfill = db.connect();
    backfill.take_upgrade_lock().unwrap();
    let r = run_on(&db, &["finalize"]);
    r.expect_code(8);
    assert_contains(&r.stderr, "another hydra-upgrade is already working");
}

/// A backfilled database, and Hydra's queue runner in the middle of a transaction on
/// Builds (its lock conflicts with every write-blocking step of finalize on Builds).
fn backfilled_with_a_builds_writer_mid_transaction() -> (TestDb, Db) {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    let mut holder = db.connect();
    holder
        .client()
        .batch_execute("BEGIN; UPDATE builds SET priority = priority WHERE id = 1;")
        .unwrap();
    (db, holder)
}

/// Within `upgrade` a Ctrl-C sets the stop flag (the handler holds the signal): finalize
/// stops before its next long step, which cannot be stopped once begun, with exit 130,
/// and the re-run finishes.
#[test]
fn an_asked_for_stop_ends_finalize_before_its_next_long_step() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    let mut conn = db.connect();
    let out = hydra_upgrade::progress::Out::new(true);
    let opts = hydra_upgrade::finalize::Options::defaults();
    let stop = hydra_upgrade::interrupt::Interrupt::default();
    stop.request();
    let stopped = hydra_upgrade::finalize::run(&mut conn, &opts, &out, &stop)
        .expect_err("a stop was asked for");
    assert_eq!(
        hydra_upgrade::exit::exit_of(&stopped),
        hydra_upgrade::exit::Exit::Interrupted,
        "{stopped:#}"
    );
    // Stopped before Jobs' VALIDATE: its check added, not validated.
    assert_eq!(db.version(), 61);
    assert_eq!(db.unvalidated_helper_checks(), 1);
    drop(conn);
    run_on(&db, &["finalize"]).expect_code(0);
    assert_eq!(db.version(), 65);
}

#[test]
fn finalize_waits_out_a_conflicting_lock_with_short_retries() {
    let (db, mut holder) = backfilled_with_a_builds_writer_mid_transaction();
    let c = holder.client();
    let handle = spawn_on(&db, &["finalize", "--lock-timeout-ms", "100"]);
    // Until finalize has waited in the lock queue behind the writer at least once, and
    // a little longer than one attempt's lock_timeout.
    wait_for("finalize to wait for the writer's lock", || {
        db.query_i64(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'hydra-upgrade'
                AND wait_event_type = 'Lock'",
        ) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    c.batch_execute("COMMIT").unwrap();
    let out = handle.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("Hydra holds a conflicting lock, retry"),
        "{stderr}"
    );
    // An attempt that gave up waited 100 ms in the lock queue, with Hydra's writes queued
    // behind it: that wait is write-blocking time and is reported as such.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let longest: f64 = stdout
        .split("longest write-blocking lock ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no longest lock in: {stdout}"));
    assert!((0.095..1.0).contains(&longest), "{stdout}");
    assert_eq!(db.version(), 65);
}

#[test]
fn finalize_gives_up_with_exit_14_when_the_lock_stays_taken() {
    let (db, mut holder) = backfilled_with_a_builds_writer_mid_transaction();
    let c = holder.client();
    let r = run_on(
        &db,
        &["finalize", "--lock-timeout-ms", "100", "--max-retries", "1"],
    );
    c.batch_execute("COMMIT").unwrap();
    r.expect_code(14);
    assert_contains(&r.stderr, "could not get its short lock in 2 tries");
    assert!(db.version() < 65, "nothing is claimed done");
    // With the lock gone, the same command finishes.
    run_on(&db, &["finalize"]).expect_code(0);
    assert_eq!(db.version(), 65);
}

#[test]
fn finalize_resumes_after_an_invalid_leftover_index() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    // An interrupted CREATE INDEX CONCURRENTLY leaves an invalid index behind.
    db.exec(
        "CREATE INDEX hydra_upgrade_tmp_64 ON builds (id);
         UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'hydra_upgrade_tmp_64'::regclass;",
    );
    let r = run_on(&db, &["finalize"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        "dropping the invalid leftover index hydra_upgrade_tmp_64",
    );
    let def = db.query_string("SELECT pg_get_indexdef('indexfinishedsuccessfulbuilds'::regclass)");
    assert!(
        def.contains("(id DESC, buildstatus, finished, job, jobset_id)"),
        "{def}"
    );
}

/// A small synthetic Hydra for rehearse runs.
const SMALL: &[&str] = &[
    "--builds",
    "2000",
    "--jobs",
    "200",
    "--jobsets",
    "10",
    "--projects",
    "5",
];

#[test]
fn rehearse_runs_the_whole_upgrade_on_synthetic_data() {
    let r = run(&[
        "rehearse",
        "--builds",
        "3000",
        "--jobs",
        "300",
        "--jobsets",
        "20",
        "--projects",
        "5",
    ]);
    r.expect_code(0);
    for needle in [
        "rehearsal on synthetic data: 3000 builds, 300 jobs",
        "switch to the migration package",
        "backfill builds",
        "HOT updates",
        "longest lock blocking Hydra's writes in the final phase",
        "final schema version: 65",
    ] {
        assert!(
            r.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            r.stdout
        );
    }
    let stock = run(&[&["rehearse", "--stock-final"], SMALL].concat());
    stock.expect_code(0);
    assert!(
        !stock.stdout.contains("final phase, online step"),
        "{}",
        stock.stdout
    );
    assert_contains(
        &stock.stdout,
        "longest lock blocking Hydra's writes in the final phase",
    );
    assert_contains(&stock.stdout, "final schema version: 65");
    let j = run(&[&["--json", "rehearse"], SMALL].concat());
    j.expect_code(0);
    let (_, doc) = j.json_lines();
    assert_eq!(doc["builds"], 2000);
    assert_eq!(doc["upgrade"]["final_status"]["schema_version"], 65);
}

#[test]
fn rehearse_on_a_copy_of_a_database_and_of_a_dump() {
    let db = hydra_at(60);
    let before = db.digest_without_jobset_id();
    let r = run(&["rehearse", "--from-db", &db.dsn]);
    r.expect_code(0);
    assert_contains(
        &r.stdout,
        &format!("rehearsal on copy of dbname={}", db.name),
    );
    assert_contains(&r.stdout, "final schema version: 65");
    assert_eq!(db.version(), 60, "the source is only read");
    assert_eq!(db.digest_without_jobset_id(), before);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hydra.dump");
    cluster()
        .client_tool("pg_dump")
        .args(["-Fc", "-f"])
        .arg(&file)
        .arg(cluster().dsn_string(&db.name, SUPERUSER))
        .run()
        .unwrap();
    let r = run(&["rehearse", "--from-dump", file.to_str().unwrap()]);
    r.expect_code(0);
    assert_contains(&r.stdout, "final schema version: 65");
}

#[test]
fn rehearse_checks_its_source_before_copying_it() {
    let r = run(&["rehearse", "--from-dump", "/nonexistent/hydra.dump"]);
    r.expect_code(3);
    assert_contains(&r.stderr, "no such file");
    assert!(
        !r.stderr.contains("starting a throwaway"),
        "nothing is started for a missing file: {}",
        r.stderr
    );
    // Nothing listens on this socket directory.
    let r = run(&[
        "rehearse",
        "--from-db",
        "host=/nonexistent dbname=hydra user=hydra",
    ]);
    r.expect_code(4);
    let empty = empty_db();
    let r = run(&["rehearse", "--from-db", &empty.dsn]);
    r.expect_code(5);
    assert_contains(&r.stderr, "--from-db is not a Hydra database");
}

#[test]
fn simulated_upgrade_from_58_to_65() {
    let db = hydra_at(58);
    let digest = db.digest_without_jobset_id();
    let r = run_on(&db, &["upgrade", "--simulate-host", "--yes"]);
    r.expect_code(0);
    assert_eq!(db.version(), 65);
    assert_eq!(db.wrong_or_null(), 0);
    assert_eq!(db.digest_without_jobset_id(), digest);
    assert_eq!(
        db.query_i64("SELECT count(*) FROM pg_attribute WHERE attname = 'jobset_id' AND attnotnull AND attrelid IN ('jobs'::regclass, 'builds'::regclass)"),
        2
    );
    let j = run_on(&db, &["status", "--json"]).json();
    assert_eq!(j["stage"], "final");
    assert_eq!(j["final_indexes"][0][1], true);
    assert_eq!(j["final_indexes"][1][1], true);
}

/// finalize lifts its session's timeouts for its long online steps (VALIDATE, CREATE
/// INDEX CONCURRENTLY); `upgrade` goes on with the same connection, so they are reset
/// when it ends, failed or finished: back to the database's own (set here with ALTER
/// DATABASE), which before stayed lifted (0 and 0).
#[test]
fn finalize_hands_its_connection_back_with_the_databases_settings() {
    let (db, mut holder) = backfilled_with_a_builds_writer_mid_transaction();
    db.exec(&format!(
        "ALTER DATABASE \"{0}\" SET lock_timeout = '3s'; \
         ALTER DATABASE \"{0}\" SET statement_timeout = '5min'",
        db.name
    ));
    let mut conn = db.connect();
    let own = session_settings(&mut conn);
    assert_eq!(own, ["3s", "5min", "on"]);
    let out = hydra_upgrade::progress::Out::new(true);
    let opts = hydra_upgrade::finalize::Options {
        lock_timeout: Duration::from_millis(100),
        max_retries: 0,
        ..hydra_upgrade::finalize::Options::defaults()
    };
    let interrupt = hydra_upgrade::interrupt::Interrupt::default();
    let failed = hydra_upgrade::finalize::run(&mut conn, &opts, &out, &interrupt)
        .expect_err("Builds' writer holds its lock");
    assert_eq!(
        hydra_upgrade::exit::exit_of(&failed),
        hydra_upgrade::exit::Exit::RetriesExhausted,
        "{failed:#}"
    );
    assert_eq!(
        session_settings(&mut conn),
        own,
        "after a finalize that failed"
    );
    holder.client().batch_execute("COMMIT").unwrap();
    hydra_upgrade::finalize::run(
        &mut conn,
        &hydra_upgrade::finalize::Options::defaults(),
        &out,
        &interrupt,
    )
    .unwrap();
    assert_eq!(db.version(), 65);
    assert_eq!(
        session_settings(&mut conn),
        own,
        "after a finalize that finished"
    );
}
