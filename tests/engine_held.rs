//! Rows other transactions hold locked (Hydra's evaluator holds a jobset's current builds
//! for minutes): the walk skips them and fills them last, one at a time. In its own test
//! binary (its own cluster) because these tests keep a transaction with an id open while a
//! backfill runs, which holds back pruning in every database of the cluster and would
//! take the HOT updates from the other binaries' backfills.
mod common;

use common::*;

/// A row held past every retry ends the run with exit 14, once every other row is
/// filled; the re-run fills just that row (its walk is not done again).
#[test]
fn a_row_lock_held_past_every_retry_ends_the_backfill_with_exit_14() {
    held_past_every_retry(&["--lock-timeout-ms", "100"], "raise --lock-timeout-ms");
}

/// The same with a `lock_timeout` above the `statement_timeout` (or none): the held row's
/// wait ends before the statement timeout would cut it off, so it is lock contention
/// (exit 14, the row listed), not a server too slow for a batch of one (exit 1), and the
/// hint names the limit that cut the wait.
#[test]
fn a_held_rows_wait_past_the_statement_timeout_is_lock_contention() {
    held_past_every_retry(
        &["--lock-timeout-ms", "5000", "--statement-timeout-ms", "400"],
        "each wait for the row's lock was cut to 200 ms, half the statement_timeout: raise \
         --statement-timeout-ms",
    );
}

fn held_past_every_retry(timeouts: &[&str], hint: &str) {
    let db = hydra_at(61);
    let mut holder = db.connect();
    let c = holder.client();
    // A session sitting on a Builds row the first batch needs.
    c.batch_execute(
        "BEGIN; SELECT 1 FROM builds WHERE id = (SELECT min(id) FROM builds) FOR UPDATE;",
    )
    .unwrap();
    let mut args = vec!["backfill", "--strategy", "keyset", "--max-retries", "1"];
    args.extend_from_slice(timeouts);
    let r = run_on(&db, &args);
    r.expect_code(14);
    assert_contains(
        &r.stderr,
        "still failed after 1 retries because of lock contention",
    );
    assert_contains(&r.stderr, "held by another transaction");
    assert_contains(&r.stderr, hint);
    assert_eq!(
        db.query_i64("SELECT count(*) FROM builds WHERE jobset_id IS NULL"),
        1,
        "every row but the held one is filled"
    );
    assert_contains(
        &run_on(&db, &["status"]).stdout,
        "backfill builds: 1 rows found locked by another transaction are still to be filled",
    );
    c.batch_execute("COMMIT").unwrap();
    // The re-run the message suggests finishes the job, with the one row.
    let again = run_on(&db, &["--json", "backfill"]);
    again.expect_code(0);
    let (events, report) = again.json_lines();
    assert_eq!(
        table_report(&report, "builds")["rows_updated"],
        1,
        "{report}"
    );
    assert!(
        events.iter().all(|e| e["event"] != "strategy"),
        "the re-run walked again: {events:?}"
    );
    assert_eq!(db.wrong_or_null(), 0);
}

/// Hydra's evaluator holds rows for minutes: its transaction clears `isCurrent` on every
/// current build of the jobset first and stores the evaluation after (and writes Jobs
/// rows too). The walk does not wait long for such rows: it fills every other row, then
/// waits for the held ones one at a time, holding no other row meanwhile (a waiting
/// batch held the rows it had updated, which Hydra's writes then waited for, and could
/// deadlock with the evaluator). Without `SKIP LOCKED` the first batch waits with
/// nearly every row still NULL.
#[test]
fn rows_hydra_holds_locked_are_filled_last_without_holding_any_other_row() {
    let db = hydra_at(61);
    let (project, jobset) = {
        let mut c = db.connect();
        let r = c
            .client()
            .query_one(
                "SELECT project, jobset FROM builds WHERE iscurrent = 1
                  GROUP BY project, jobset ORDER BY count(*) DESC, project, jobset LIMIT 1",
                &[],
            )
            .unwrap();
        (r.get::<_, String>(0), r.get::<_, String>(1))
    };
    let mut jobs_holder = db.connect();
    let jobs_pid = jobs_holder.backend_pid().unwrap();
    jobs_holder.client().batch_execute("BEGIN").unwrap();
    let held_jobs = jobs_holder
        .client()
        .query(
            "SELECT 1 FROM jobs WHERE project = $1 AND jobset = $2 FOR UPDATE",
            &[&project, &jobset],
        )
        .unwrap()
        .len() as i64;
    let mut evaluator = db.connect();
    let evaluator_pid = evaluator.backend_pid().unwrap();
    evaluator.client().batch_execute("BEGIN").unwrap();
    let held_builds = evaluator
        .client()
        .execute(
            "UPDATE builds SET iscurrent = 0 WHERE project = $1 AND jobset = $2 AND iscurrent = 1",
            &[&project, &jobset],
        )
        .unwrap() as i64;
    assert!(
        held_jobs > 0 && held_builds > 0,
        "{held_jobs} {held_builds}"
    );

    let handle = spawn_on(&db, &["--json", "backfill", "--lock-timeout-ms", "60000"]);
    for (pid, table, held, conn) in [
        (jobs_pid, "jobs", held_jobs, &mut jobs_holder),
        (evaluator_pid, "builds", held_builds, &mut evaluator),
    ] {
        wait_for_session_blocked_by(&db, pid);
        assert_eq!(
            db.query_i64(&format!(
                "SELECT count(*) FROM {table} WHERE jobset_id IS NULL"
            )),
            held,
            "{table}: when the backfill waits, only the held rows are left"
        );
        // Every other row of the table can be locked at once: the waiting backfill
        // holds none.
        let mut other = db.connect();
        let mut tx = other.client().transaction().unwrap();
        let locked = tx.query(
            &format!(
                "SELECT 1 FROM {table} WHERE NOT (project = $1 AND jobset = $2) FOR UPDATE NOWAIT"
            ),
            &[&project, &jobset],
        );
        assert!(
            locked.is_ok(),
            "{table}: a row is locked while the backfill waits: {locked:?}"
        );
        tx.rollback().unwrap();
        conn.client().batch_execute("COMMIT").unwrap();
    }
    let out = handle.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("\"event\":\"held\""), "{stdout}");
    assert_eq!(db.wrong_or_null(), 0);
    let report = last_json_document(&stdout);
    let (jobs, builds) = (
        table_report(&report, "jobs"),
        table_report(&report, "builds"),
    );
    assert_eq!(jobs["held_rows_filled_after"], held_jobs, "{jobs}");
    assert_eq!(builds["held_rows_filled_after"], held_builds, "{builds}");
    // Once a round's wait ran out, the next rounds left the held rows out at once
    // instead of waiting 50 ms again each.
    let (given_up, skipping) = (
        builds["row_waits_given_up"].as_u64().unwrap(),
        builds["rounds_skipping_held_rows"].as_u64().unwrap(),
    );
    assert!(given_up >= 1 && skipping > given_up, "{builds}");
}

/// Wait until a session has waited half a second for a lock `holder` holds (a per-page
/// round waits 50 ms at most, then leaves the held rows out).
fn wait_for_session_blocked_by(db: &TestDb, holder: i32) {
    wait_for(&format!("a session to wait for {holder}"), || {
        db.query_i64(&format!(
            "SELECT count(*) FROM pg_stat_activity
              WHERE {holder} = ANY (pg_blocking_pids(pid))
                AND now() - query_start > interval '500 ms'"
        )) > 0
    });
}

/// After a finished walk the NULL rows left are listed in one read when there are few
/// enough; with more, nothing is listed and the table is walked.
#[test]
fn null_rows_are_listed_only_when_few() {
    use hydra_upgrade::backfill::{Table, held};
    let db = hydra_at(61);
    let mut conn = db.connect();
    hydra_upgrade::backfill::state::ensure(&mut conn).unwrap();
    held::ensure(&mut conn).unwrap();
    let fillable = db.query_i64(
        "SELECT count(*) FROM builds b JOIN jobsets js ON js.project = b.project AND js.name = b.jobset",
    );
    assert_eq!(
        held::list_nulls(&mut conn, Table::Builds, fillable - 1).unwrap(),
        None
    );
    assert_eq!(
        held::count(conn.client(), Table::Builds).unwrap(),
        0,
        "nothing listed"
    );
    assert_eq!(
        held::list_nulls(&mut conn, Table::Builds, fillable).unwrap(),
        Some(fillable)
    );
    assert_eq!(held::count(conn.client(), Table::Builds).unwrap(), fillable);
}
