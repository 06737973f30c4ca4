//! Replication slots and HOT: only a slot's `xmin` keeps Builds' dead rows from being
//! pruned. In its own test binary (its own cluster) because creating a logical slot waits
//! for every transaction running in the cluster to end.
mod common;

use common::*;

#[test]
fn a_logical_slot_does_not_turn_auto_to_keyset() {
    let db = hydra_at(61);
    db.exec("SELECT pg_create_logical_replication_slot('hu_test_slot', 'test_decoding')");
    let r = run_on(&db, &["backfill"]);
    db.exec("SELECT pg_drop_replication_slot('hu_test_slot')");
    r.expect_code(0);
    assert_contains(&r.stderr, "builds: strategy per-page");
    assert!(
        !r.stderr.contains("holds back the xmin horizon"),
        "{}",
        r.stderr
    );
    // But named as a slot nobody reads from, which keeps the backfill's WAL.
    assert_contains(&r.stderr, "with no receiver connected: hu_test_slot (");
}
