//! A plain VACUUM and HOT: PostgreSQL leaves its snapshot out of pruning, so it must not
//! count as an old snapshot. In its own test binary (its own cluster) because the check
//! looks at every session of the cluster, and other tests hold snapshots on purpose.
mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_plain_vacuum_is_not_taken_for_an_old_snapshot() {
    let db = hydra_at(61);
    // A VACUUM waiting for its table's lock has taken its snapshot already: it shows as
    // `VACUUM projects` with an xmin for as long as the lock is held.
    let mut locker = db.connect();
    locker
        .client()
        .batch_execute("BEGIN; LOCK TABLE projects IN SHARE UPDATE EXCLUSIVE MODE")
        .unwrap();
    let mut vacuumer = db.connect();
    let vacuum = std::thread::spawn(move || {
        vacuumer
            .client()
            .batch_execute("VACUUM projects")
            .map_err(|e| e.to_string())
    });
    wait_for("the VACUUM to wait", || {
        db.query_i64(
            "SELECT count(*) FROM pg_stat_activity
              WHERE query = 'VACUUM projects' AND backend_xmin IS NOT NULL",
        ) > 0
    });
    std::thread::sleep(Duration::from_millis(1500));
    let r = run_on(&db, &["backfill", "--horizon-age-secs", "1"]);
    locker.client().batch_execute("ROLLBACK").unwrap();
    vacuum.join().unwrap().unwrap();
    r.expect_code(0);
    assert_contains(&r.stderr, "builds: strategy per-page");
    assert!(!r.stderr.contains("holds a snapshot"), "{}", r.stderr);
}
