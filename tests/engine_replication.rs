//! Standbys that fall behind: the backfill waits for them, gives up on one that stores
//! nothing, commits as Hydra does under synchronous replication, and sees a standby through
//! its slot when its role may not read `pg_stat_replication`'s positions; finalize waits
//! for them before its long steps. In its own test
//! binary (its own cluster): the standbys follow every database of the cluster, and each
//! test holds [`serial`] since stopping a standby's receiver (and, with synchronous
//! replication, every commit in the cluster) would disturb the others.
mod common;

use std::io::BufRead;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use hydra_upgrade::pg_cluster::PgCluster;
use serde_json::Value;

/// A standby streaming through a physical slot (as most production standbys do).
const SLOT_STANDBY: &str = "hu_slot_standby";
/// A standby with no slot.
const PLAIN_STANDBY: &str = "hu_plain_standby";

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn standbys() -> &'static [&'static PgCluster; 2] {
    static STANDBYS: OnceLock<[&'static PgCluster; 2]> = OnceLock::new();
    STANDBYS.get_or_init(|| {
        let start = |name, slot| {
            cluster()
                .start_standby(name, slot)
                .expect("starting a standby")
                .share_until_exit(std::process::id())
                .expect("watching the test process")
        };
        [
            start(SLOT_STANDBY, Some(SLOT_STANDBY)),
            start(PLAIN_STANDBY, None),
        ]
    })
}

/// Wait until both standbys stream and have stored all the WAL written so far: until a
/// receiver's first reply its walsender shows no position at all.
fn standbys_caught_up() {
    standbys();
    let mut primary = cluster().connect("postgres").unwrap();
    wait_for("the standbys to catch up", || {
        primary
            .client()
            .query_one(
                "SELECT count(*) FROM pg_stat_replication
                  WHERE state = 'streaming' AND flush_lsn >= pg_current_wal_lsn()",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            >= 2
    });
}

/// A standby's WAL receiver stopped (SIGSTOP): it stays connected and stores nothing, as
/// a standby on a slow disk or link would. Let go (SIGCONT) when dropped, so that a
/// failing test does not leave it stopped for the next.
struct Stopped(String);

impl Stopped {
    fn receiver_of(standby: &PgCluster) -> Stopped {
        let pid: i32 = standby
            .connect("postgres")
            .unwrap()
            .client()
            .query_one("SELECT pid FROM pg_stat_wal_receiver", &[])
            .unwrap()
            .get(0);
        let pid = pid.to_string();
        duct::cmd("kill", ["-STOP", &pid]).run().expect("kill");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = duct::cmd("kill", ["-CONT", &self.0]).run();
    }
}

fn nulls(db: &TestDb) -> i64 {
    db.query_i64(
        "SELECT (SELECT count(*) FROM builds WHERE jobset_id IS NULL)
              + (SELECT count(*) FROM jobs WHERE jobset_id IS NULL)",
    )
}

/// WAL the stopped standby does not store: 40 MB, over the smallest limit (two 16 MB
/// segments), committed so that it is written at once.
fn write_wal(db: &TestDb) {
    db.exec("SELECT pg_logical_emit_message(true, 'hydra-upgrade-test', repeat('x', 41943040))");
}

/// The command (`args` from the subcommand on) with `--json`, read event by event.
fn json_events(db: &TestDb, args: &[&str]) -> duct::ReaderHandle {
    let mut full = vec!["--db", db.dsn.as_str(), "--json"];
    full.extend_from_slice(args);
    bare_command(&full).stderr_capture().reader().unwrap()
}

/// Read events until one of `kind` (panics at the end of the output).
fn until_event(lines: &mut impl Iterator<Item = std::io::Result<String>>, kind: &str) -> Value {
    let mut seen = Vec::new();
    for line in lines {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if event["event"] == kind {
            return event;
        }
        seen.push(event);
    }
    panic!("no {kind} event before the run ended:\n{seen:#?}");
}

#[test]
fn a_standby_far_behind_holds_the_backfill_until_it_has_caught_up() {
    let _serial = serial();
    let db = hydra_at(61);
    let before = nulls(&db);
    standbys_caught_up();
    let stopped = Stopped::receiver_of(standbys()[0]);
    write_wal(&db);
    let reader = json_events(&db, &["backfill", "--max-replication-lag-mb", "1"]);
    let mut lines = std::io::BufReader::new(&reader).lines();
    let wait = until_event(&mut lines, "replication-wait");
    assert_eq!(wait["receiver"], SLOT_STANDBY, "{wait}");
    assert_eq!(wait["limit_bytes"], 32 << 20, "{wait}");
    assert!(wait["behind_bytes"].as_i64().unwrap() > 40 << 20, "{wait}");
    // While it waits, nothing is written, and it keeps waiting.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(nulls(&db), before);
    assert!(reader.try_wait().unwrap().is_none(), "the backfill ended");
    drop(stopped);
    let caught_up = until_event(&mut lines, "replication-caught-up");
    assert!(
        caught_up["behind_bytes"].as_i64().unwrap() <= 16 << 20,
        "{caught_up}"
    );
    let rest: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let out = reader.try_wait().unwrap().expect("the backfill has ended");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(db.wrong_or_null(), 0);
    // The wait began before the first batch of Jobs, the first table.
    let report = rest.last().unwrap();
    let waited = table_report(report, "jobs")["replication_wait_seconds"]
        .as_f64()
        .unwrap();
    assert!(waited >= 2.0, "{report}");
}

#[test]
fn a_standby_that_stores_nothing_ends_the_backfill_with_exit_17_and_the_rerun_finishes() {
    let _serial = serial();
    let db = hydra_at(61);
    standbys_caught_up();
    let stopped = Stopped::receiver_of(standbys()[1]);
    write_wal(&db);
    let args = [
        "--max-replication-lag-mb",
        "1",
        "--replication-stall-secs",
        "2",
    ];
    let mut full = vec!["--db", db.dsn.as_str(), "backfill"];
    full.extend_from_slice(&args);
    let r = run(&full);
    r.expect_code(17);
    assert_contains(&r.stderr, "hu_plain_standby (walsender pid ");
    assert_contains(&r.stderr, "has stored no WAL for 2 s");
    drop(stopped);
    let again = run(&full);
    again.expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

/// A receiver that keeps reconnecting without storing anything (a subscriber whose apply
/// fails and restarts, a standby whose connection drops) is still waited for through its
/// slot, and still runs into the stall time: before, its walsender's leaving ended the
/// wait as if it had caught up.
#[test]
fn a_standby_whose_walsender_goes_away_is_still_waited_for_through_its_slot() {
    let _serial = serial();
    let db = hydra_at(61);
    standbys_caught_up();
    let stopped = Stopped::receiver_of(standbys()[0]);
    write_wal(&db);
    let reader = json_events(
        &db,
        &[
            "backfill",
            "--max-replication-lag-mb",
            "1",
            "--replication-stall-secs",
            "6",
        ],
    );
    let mut lines = std::io::BufReader::new(&reader).lines();
    until_event(&mut lines, "replication-wait");
    wait_for("the walsender to go", || {
        db.query_i64(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication
              WHERE application_name = '{SLOT_STANDBY}'"
        )) == 0
    });
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = reader.try_wait().unwrap().expect("the backfill has ended");
    assert_eq!(out.status.code(), Some(17), "{rest:#?}");
    let error = rest.last().unwrap();
    assert!(
        error.contains("hu_slot_standby (slot hu_slot_standby, no receiver connected right now)"),
        "{error}"
    );
    drop(stopped);
    run_on(&db, &["backfill"]).expect_code(0);
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn under_synchronous_replication_the_backfill_commits_as_hydra_does() {
    let _serial = serial();
    let db = hydra_at(61);
    standbys_caught_up();
    admin_sets(
        cluster(),
        "synchronous_standby_names",
        PLAIN_STANDBY,
        PLAIN_STANDBY,
    );
    // Put back even when the test fails (without a panic inside a panic).
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let reset = cluster().connect("postgres").and_then(|mut db| {
                hydra_upgrade::wal_prepare::alter_system(
                    &mut db,
                    "synchronous_standby_names",
                    None,
                )?;
                hydra_upgrade::wal_prepare::reload(&mut db)?;
                hydra_upgrade::wal_prepare::wait_for_settings(
                    &mut db,
                    &["synchronous_standby_names"],
                    |_, now| now.is_empty(),
                )
            });
            if let Err(e) = reset {
                eprintln!("resetting synchronous_standby_names: {e:#}");
            }
        }
    }
    let _reset = Reset;
    let stopped = Stopped::receiver_of(standbys()[1]);
    // Not waiting for any standby's lag: only the commits' own waits hold it.
    let reader = json_events(&db, &["backfill", "--max-replication-lag-mb", "0"]);
    let mut lines = std::io::BufReader::new(&reader).lines();
    until_event(&mut lines, "synchronous-replication");
    let mut watcher = cluster().connect("postgres").unwrap();
    wait_for("a commit of ours to wait for the standby", || {
        assert!(
            reader.try_wait().unwrap().is_none(),
            "the backfill ended without waiting for the synchronous standby"
        );
        watcher
            .client()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE application_name = 'hydra-upgrade' AND wait_event = 'SyncRep'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    drop(stopped);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = reader.try_wait().unwrap().expect("the backfill has ended");
    assert_eq!(out.status.code(), Some(0), "{rest:#?}");
    assert_eq!(db.wrong_or_null(), 0);
}

#[test]
fn a_role_without_pg_read_all_stats_sees_a_standby_through_its_slot() {
    let _serial = serial();
    let db = hydra_at(61);
    standbys_caught_up();
    let dsn = owned_by_hydra_role(&db);
    let plan = run(&["--db", &dsn, "--json", "plan"]);
    plan.expect_code(0);
    let seen = &plan.json()["replication"];
    // The slot's standby through its slot; the other one not at all.
    assert_eq!(seen["receivers"][0]["name"], SLOT_STANDBY, "{seen}");
    assert_eq!(seen["receivers"].as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen["hidden"], 1, "{seen}");
    assert_eq!(seen["limit_mb"], 128, "{seen}");
    assert_eq!(seen["limit_bytes"], 128 << 20, "{seen}");
    let text = run(&["--db", &dsn, "plan"]);
    assert_contains(
        &text.stdout,
        "warning: 1 walsender(s) stream from this server with no replication slot, and this \
         role cannot see how far behind they are: GRANT pg_read_all_stats",
    );
    // It waits for the slot's standby: this one stores nothing, so the run ends at the
    // stall time.
    let stopped = Stopped::receiver_of(standbys()[0]);
    write_wal(&db);
    let r = run(&[
        "--db",
        &dsn,
        "backfill",
        "--max-replication-lag-mb",
        "1",
        "--replication-stall-secs",
        "2",
    ]);
    r.expect_code(17);
    assert_contains(&r.stderr, "hu_slot_standby (walsender pid ");
    drop(stopped);
    let r = run(&["--db", &dsn, "backfill"]);
    r.expect_code(0);
    assert_contains(
        &r.stderr,
        &format!("jobs: streaming to {SLOT_STANDBY}; the backfill waits"),
    );
    assert_contains(&r.stderr, "GRANT pg_read_all_stats");
    assert_eq!(db.wrong_or_null(), 0);

    // With the grant it sees both.
    let again = hydra_at(61);
    let dsn = owned_by_hydra_role(&again);
    again.exec("GRANT pg_read_all_stats TO hu_owner");
    let plan = run(&["--db", &dsn, "--json", "plan"]);
    let seen = &plan.json()["replication"];
    assert_eq!(seen["receivers"].as_array().unwrap().len(), 2, "{seen}");
    assert_eq!(seen["hidden"], 0, "{seen}");
    let r = run(&["--db", &dsn, "backfill"]);
    r.expect_code(0);
    assert!(!r.stderr.contains("pg_read_all_stats"), "{}", r.stderr);
    assert_eq!(again.wrong_or_null(), 0);
    // Nothing left to backfill: finalize, still to come, waits for them too.
    let plan = run(&["--db", &dsn, "--json", "plan"]).json();
    assert_eq!(
        plan["replication"]["receivers"].as_array().unwrap().len(),
        2,
        "{plan}"
    );
    run(&["--db", &dsn, "finalize"]).expect_code(0);
    // At the final stage: nothing to say about replication.
    assert_eq!(
        run(&["--db", &dsn, "--json", "plan"]).json()["replication"],
        Value::Null
    );
}

#[test]
fn a_slot_with_no_receiver_is_named_with_the_wal_it_keeps() {
    let _serial = serial();
    let db = hydra_at(61);
    let mut admin = cluster().connect("postgres").unwrap();
    admin
        .client()
        .batch_execute("SELECT pg_create_physical_replication_slot('hu_gone', true)")
        .unwrap();
    let plan = run_on(&db, &["plan"]);
    let r = run_on(&db, &["backfill"]);
    admin
        .client()
        .batch_execute("SELECT pg_drop_replication_slot('hu_gone')")
        .unwrap();
    plan.expect_code(0);
    assert_contains(
        &plan.stdout,
        "warning: replication slot(s) with no receiver connected: hu_gone (",
    );
    r.expect_code(0);
    assert_contains(&r.stderr, "with no receiver connected: hu_gone (");
    assert_contains(&r.stderr, "the backfill does not wait for it");
}

/// Finalize's index builds each log their whole index and cannot be paused once begun:
/// before each long step it waits, as the backfill does between transactions.
#[test]
fn a_standby_far_behind_holds_finalize_before_its_long_steps() {
    let _serial = serial();
    // At 61 the first long step is Jobs' VALIDATE: its check is there, not yet validated.
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    finalize_held_by_a_standby(&db, "jobs", || {
        assert_eq!(db.unvalidated_helper_checks(), 1);
        assert_eq!(db.version(), 61);
    });
    // At 63 (Hydra's own SET NOT NULL done) it is the first index build: none begun.
    let db = hydra_at(61);
    run_on(&db, &["backfill"]).expect_code(0);
    db.upgrade_to(63);
    finalize_held_by_a_standby(&db, "builds", || {
        assert_eq!(
            db.query_i64("SELECT count(*) FROM pg_class WHERE relname LIKE 'hydra_upgrade_tmp_%'"),
            0
        );
        assert_eq!(db.version(), 63);
    });
}

/// Finalize on `db` with a standby stopped 40 MB behind: it waits before its first long
/// step (on `table`), where `while_waiting` holds, and finishes once the standby is let go.
fn finalize_held_by_a_standby(db: &TestDb, table: &str, while_waiting: impl Fn()) {
    standbys_caught_up();
    let stopped = Stopped::receiver_of(standbys()[0]);
    write_wal(db);
    let reader = json_events(db, &["finalize", "--max-replication-lag-mb", "1"]);
    let mut lines = std::io::BufReader::new(&reader).lines();
    let wait = until_event(&mut lines, "replication-wait");
    assert_eq!(wait["receiver"], SLOT_STANDBY, "{wait}");
    assert_eq!(wait["table"], table, "{wait}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(reader.try_wait().unwrap().is_none(), "finalize ended");
    while_waiting();
    drop(stopped);
    until_event(&mut lines, "replication-caught-up");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let out = reader.try_wait().unwrap().expect("finalize has ended");
    assert_eq!(out.status.code(), Some(0), "{rest:#?}");
    assert_eq!(db.version(), 65);
    let report: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    let waited = report["replication_wait_seconds"].as_f64().unwrap();
    assert!(waited >= 2.0, "{report}");
}

/// Finalize's look before a long step is taken however soon after the last one: with the
/// backfill's once-a-second limit, a quick Jobs step would let Builds' begin unlooked at.
#[test]
fn the_look_before_a_long_step_is_taken_however_soon_after_the_last() {
    use hydra_upgrade::backfill::replication::{LagWatch, Settings, Waiter};
    let _serial = serial();
    let db = hydra_at(61);
    let mut conn = db.connect();
    let out = hydra_upgrade::progress::Out::new(true);
    let settings = Settings {
        max_lag_mb: 1,
        stall: Duration::from_secs(300),
    };
    let mut watch = LagWatch::new(settings, Waiter::Finalize);
    standbys_caught_up();
    assert_eq!(watch.behind(&mut conn, "jobs", &out).unwrap(), None);
    let looked = Instant::now();
    let _stopped = Stopped::receiver_of(standbys()[0]);
    // Four segment switches, each after a record: at least three whole 16 MB segments the
    // stopped standby does not have, in milliseconds (the limit is two segments).
    db.exec(
        &"SELECT pg_logical_emit_message(false, 'hydra-upgrade-test', 'x'); \
          SELECT pg_switch_wal();"
            .repeat(4),
    );
    // The limited look, within the second, is not taken (on a machine too slow to get
    // here within the second it is, and proves nothing).
    if looked.elapsed() < Duration::from_millis(900) {
        assert_eq!(watch.behind(&mut conn, "builds", &out).unwrap(), None);
    }
    let behind = watch
        .behind_now(&mut conn, "builds", &out)
        .unwrap()
        .expect("the stopped standby is seen behind");
    assert_eq!(behind.name, SLOT_STANDBY);
    assert!(behind.bytes > 32 << 20, "{behind:?}");
}

/// A standby with `hot_standby_feedback` holds back the xmin horizon through its slot
/// even with no query running (its xmin moves with its feedback only): `auto` walks
/// Builds by keyset, saying why and what the admin can do.
#[test]
fn a_standby_with_hot_standby_feedback_turns_auto_to_keyset() {
    /// Sets the slot standby's hot_standby_feedback, and off again when dropped.
    struct Feedback;
    impl Feedback {
        fn set(on: bool) {
            let mut standby = standbys()[0].connect("postgres").unwrap();
            let value = if on { "on" } else { "off" };
            for sql in [
                format!("ALTER SYSTEM SET hot_standby_feedback = {value}"),
                "SELECT pg_reload_conf()".into(),
            ] {
                standby.client().batch_execute(&sql).unwrap();
            }
            slot_xmin_until(!on);
        }
    }
    impl Drop for Feedback {
        fn drop(&mut self) {
            Feedback::set(false);
        }
    }
    /// Wait until the slot's xmin is cleared (`cleared`), or set.
    fn slot_xmin_until(cleared: bool) {
        let mut primary = cluster().connect("postgres").unwrap();
        wait_for("the slot's xmin to change", || {
            primary
                .client()
                .query_one(
                    "SELECT xmin IS NULL FROM pg_replication_slots WHERE slot_name = $1",
                    &[&SLOT_STANDBY],
                )
                .unwrap()
                .get::<_, bool>(0)
                == cleared
        });
    }
    let _serial = serial();
    let db = hydra_at(61);
    standbys_caught_up();
    Feedback::set(true);
    let _off = Feedback;
    // `plan` says so beforehand.
    let plan = run_on(&db, &["plan"]);
    plan.expect_code(0);
    assert_contains(
        &plan.stdout,
        &format!(
            "warning: HOT updates of Builds are defeated right now: replication slot \
             {SLOT_STANDBY} holds back the xmin horizon ("
        ),
    );
    let r = run_on(&db, &["backfill"]);
    r.expect_code(0);
    assert_contains(&r.stderr, "builds: strategy keyset");
    assert_contains(
        &r.stderr,
        &format!("replication slot {SLOT_STANDBY} holds back the xmin horizon ("),
    );
    assert_contains(&r.stderr, "hot_standby_feedback = on; turned off there");
    assert_eq!(db.wrong_or_null(), 0);
    // Why: walked per page all the same, hardly any update of Builds is HOT
    // (`--nocapture` prints the shares with the feedback and without).
    let per_page_hot = |db: &TestDb, when: &str| {
        let r = run_on(db, &["--json", "backfill", "--strategy", "per-page"]);
        r.expect_code(0);
        let (_, report) = r.json_lines();
        let hot = table_report(&report, "builds")["hot_share"]
            .as_f64()
            .unwrap();
        eprintln!("per-page {when}: {:.1} % HOT", 100.0 * hot);
        hot
    };
    assert!(per_page_hot(&hydra_at(61), "with the standby's feedback") < 0.5);
    // With the feedback off, `plan` has nothing to warn about, and the same walk's
    // updates are HOT.
    drop(_off);
    let db = hydra_at(61);
    let plan = run_on(&db, &["--json", "plan"]);
    plan.expect_code(0);
    let (_, doc) = plan.json_lines();
    assert_eq!(doc["hot_blockers"], serde_json::json!([]), "{doc}");
    assert!(per_page_hot(&db, "without it") > 0.5);
}
