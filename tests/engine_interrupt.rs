//! Interrupting the backfill (SIGINT, SIGTERM, SIGKILL) at several points, then
//! re-running: committed work is never redone and the end state equals an
//! uninterrupted run's.

mod common;
use std::time::{Duration, Instant};

use common::*;

/// Slow enough settings that the run is still going when the signal arrives.
fn slow(strategy: &str) -> Vec<&str> {
    match strategy {
        "per-page" => vec![
            "backfill",
            "--strategy",
            "per-page",
            "--batch-size",
            "4",
            "--max-batch-size",
            "4",
            "--pause-ms",
            "4",
        ],
        _ => vec![
            "backfill",
            "--strategy",
            "keyset",
            "--batch-size",
            "40",
            "--max-batch-size",
            "40",
            "--pause-ms",
            "4",
        ],
    }
}

fn filled(db: &TestDb) -> i64 {
    db.query_i64("SELECT (SELECT count(*) FROM builds WHERE jobset_id IS NOT NULL) + (SELECT count(*) FROM jobs WHERE jobset_id IS NOT NULL)")
}

/// Until the walk of Builds has committed rows: a signal that lands between the tables
/// (Jobs done, Builds not begun) leaves nothing to resume, which is not what these tests
/// are about.
fn wait_until_started(db: &TestDb) {
    wait_for("the backfill to start", || builds_started(db));
}

fn signal(handle: &duct::Handle, sig: &str) {
    let pid = handle.pids()[0].to_string();
    duct::cmd("kill", [sig, &pid]).run().expect("kill");
}

/// Interrupt after `delay`, check the exit, re-run, compare with the expected end state.
fn interrupt_and_resume(strategy: &str, sig: &str, delay: Duration) {
    let db = hydra_at(61);
    let digest = db.digest_without_jobset_id();
    let total = db.query_i64("SELECT (SELECT count(*) FROM builds) + (SELECT count(*) FROM jobs)");
    let handle = spawn_on(&db, &slow(strategy));
    wait_until_started(&db);
    std::thread::sleep(delay);
    if sig == "-KILL" {
        handle.kill().unwrap();
        handle.wait().ok();
        db.wait_until_no_other_session();
    } else {
        signal(&handle, sig);
        let out = handle.wait().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{sig}: {stderr}");
        assert!(
            stderr.contains("interrupted; all committed work is kept"),
            "{stderr}"
        );
        assert!(stderr.contains("Run the same command again"), "{stderr}");
    }
    let done_before = filled(&db);
    assert!(
        done_before > 0 && done_before < total,
        "{sig} at {delay:?}: {done_before} of {total} filled"
    );

    let r = run_on(&db, &["--json", "backfill", "--strategy", strategy]);
    r.expect_code(0);
    assert!(
        r.stdout.contains("\"event\":\"resume\""),
        "the re-run resumed:\n{}",
        r.stdout
    );
    let (_, report) = r.json_lines();
    let redone: i64 = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["rows_updated"].as_i64().unwrap())
        .sum();
    assert_eq!(
        done_before + redone,
        total,
        "committed rows were not redone"
    );
    assert_eq!(db.wrong_or_null(), 0);
    assert_eq!(db.digest_without_jobset_id(), digest);
    run_on(&db, &["verify"]).expect_code(0);
}

#[test]
fn sigint_during_the_per_page_walk_then_resume() {
    interrupt_and_resume("per-page", "-INT", Duration::from_millis(300));
}

#[test]
fn sigterm_late_in_the_per_page_walk_then_resume() {
    interrupt_and_resume("per-page", "-TERM", Duration::from_millis(1_500));
}

#[test]
fn sigkill_during_the_per_page_walk_then_resume() {
    interrupt_and_resume("per-page", "-KILL", Duration::from_millis(700));
}

#[test]
fn sigint_during_the_keyset_walk_then_resume() {
    interrupt_and_resume("keyset", "-INT", Duration::from_millis(400));
}

#[test]
fn sigkill_during_the_keyset_walk_then_resume() {
    interrupt_and_resume("keyset", "-KILL", Duration::from_millis(200));
}

#[test]
fn sigkill_twice_then_resume() {
    let db = hydra_at(61);
    for delay in [100, 300] {
        let h = spawn_on(&db, &slow("per-page"));
        wait_until_started(&db);
        std::thread::sleep(Duration::from_millis(delay));
        h.kill().unwrap();
    }
    run_on(&db, &["backfill"]).expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn a_lost_connection_exits_with_the_connect_code_and_a_rerun_finishes() {
    let db = hydra_at(61);
    let handle = spawn_on(&db, &slow("keyset"));
    wait_until_started(&db);
    let killed = db.query_i64(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name = 'hydra-upgrade' AND datname = current_database()
            AND pid <> pg_backend_pid()) t",
    );
    assert!(killed >= 1);
    let out = handle.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("broke midway; every committed batch is kept"),
        "{stderr}"
    );
    run_on(&db, &["backfill"]).expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn an_interrupted_rehearsal_says_its_copy_is_gone_and_production_untouched() {
    let handle = spawn(&[
        "rehearse",
        "--builds",
        "20000",
        "--batch-size",
        "10",
        "--max-batch-size",
        "10",
        "--pause-ms",
        "20",
    ]);
    std::thread::sleep(Duration::from_secs(5));
    signal(&handle, "-INT");
    let out = handle.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("rehearsal interrupted"), "{stderr}");
    assert!(
        !stderr.contains("again to continue"),
        "no advice to resume what is gone: {stderr}"
    );
}

/// A Ctrl-C while a batch waits for its retry (its rows locked by a Hydra transaction)
/// stops the run at once: not after the rest of the backoff (up to 10 s) and every retry
/// left, which ended it with exit 14 about a minute later.
#[test]
fn sigint_while_a_batch_waits_for_its_retry_stops_at_once() {
    let db = hydra_at(61);
    let mut holder = db.connect();
    holder
        .client()
        .batch_execute("BEGIN; SELECT 1 FROM builds FOR UPDATE")
        .unwrap();
    // Keyset: its walk lists every held row at once, and the wait for the first one is
    // retried. (Per-page rounds wait 50 ms each for their held rows first.)
    let handle = spawn_on(
        &db,
        &[
            "backfill",
            "--strategy",
            "keyset",
            "--lock-timeout-ms",
            "50",
        ],
    );
    // By then the retries wait seconds between tries (50 ms doubling, up to 10 s).
    std::thread::sleep(Duration::from_secs(4));
    let asked = Instant::now();
    signal(&handle, "-INT");
    let out = handle.wait().unwrap();
    let took = asked.elapsed();
    holder.client().batch_execute("COMMIT").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("retry 3 in"),
        "not in its retries: {stderr}"
    );
    assert!(stderr.contains("waited to be retried"), "{stderr}");
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} to stop: {stderr}"
    );
    run_on(&db, &["backfill"]).expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

/// An administrator's `pg_cancel_backend` on our session stops the run (exit 130, as on
/// Ctrl-C), where before it was taken for our statement_timeout: the batch was halved
/// and the walk went on (or, at a batch of one, ended with exit 1). A re-run finishes.
#[test]
fn pg_cancel_backend_stops_the_backfill_and_a_rerun_finishes() {
    let db = hydra_at(61);
    let digest = db.digest_without_jobset_id();
    let handle = spawn_on(&db, &slow("per-page"));
    wait_until_started(&db);
    let mut admin = db.connect();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Our server process is idle between rounds, where a cancel does nothing: cancel it
    // whenever it is running a statement until the run ends. (Only in this test's
    // database: the other tests' runs share the cluster.)
    while handle.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the cancels never stopped the run"
        );
        admin
            .client()
            .execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = 'hydra-upgrade' \
                   AND state = 'active' AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    let out = handle.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("batch halved"),
        "taken for a timeout: {stderr}"
    );
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
    assert_eq!(db.digest_without_jobset_id(), digest);
}

/// A cancel of any statement of ours, outside the backfill's batches too (here `verify`,
/// waiting for a lock), ends with exit 130 and a hint that names who cancels statements,
/// not with exit 1 ("unexpected error").
#[test]
fn a_cancelled_verify_exits_130_with_a_hint() {
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    let mut holder = db.connect();
    holder
        .client()
        .batch_execute("BEGIN; LOCK TABLE builds IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let handle = spawn_on(&db, &["verify"]);
    cancel_lock_waiters(&db, "verify");
    let out = handle.wait().unwrap();
    holder.client().batch_execute("COMMIT").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("hint: PostgreSQL cancelled a statement of ours"),
        "{stderr}"
    );
    run_on(&db, &["verify"]).expect_code(0);
}

/// Nobody reading our output any more (a dropped SSH session's terminal answers EIO, a
/// pipe whose reader has exited EPIPE) does not end a backfill: `println!` would panic
/// at its first line; our writes drop what cannot be written.
#[test]
fn a_backfill_whose_output_has_nowhere_to_go_runs_to_its_end() {
    for json in [false, true] {
        let db = hydra_at(61);
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut args = vec!["--db", db.dsn.as_str(), "backfill"];
        if json {
            args.push("--json");
        }
        let out = bare_command(&args)
            .stdout_file(writer.try_clone().unwrap())
            .stderr_file(writer)
            .run()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "--json: {json}");
        assert_eq!(db.wrong_or_null(), 0);
    }
}
