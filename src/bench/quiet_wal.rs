//! `--quiet-wal`: before the writer's runs, leave `pg_wal` as a quiet Hydra's is.
//!
//! The bench's cluster has written the WAL of its template and copies, and its
//! checkpoints recycle those segments for future use as far as the WAL they expect
//! before the next checkpoint (an estimate from the distance between checkpoints, within
//! `min_wal_size` and `max_wal_size`): our walk finds hundreds of MB of segments ready. A
//! Hydra that writes little WAL between checkpoints keeps about `min_wal_size` (80 MB by
//! default). To get there, this alternates `pg_switch_wal()` (the next WAL goes into the
//! next segment, using up one that is ready) with `CHECKPOINT` (whose short distance
//! lowers the estimate, by a tenth each time; past the new limit, used segments are
//! removed instead of recycled), until the estimate has settled and no more segments
//! than that are ahead. Needs superuser, as the bench's cluster has.

use anyhow::{Result, bail};

use crate::backfill::wal_segments;
use crate::db::Db;

/// Checkpoints at least: the estimate falls by a tenth a checkpoint, so 40 bring any of
/// this bench's down to a few segments'.
const MIN_ROUNDS: usize = 40;
const MAX_ROUNDS: usize = 4_000;

/// What `pg_wal` holds ahead of the WAL being written (the engine's own reading).
fn ready(db: &mut Db) -> Result<wal_segments::Ready> {
    match wal_segments::ready(db)? {
        Some(r) => Ok(r),
        None => bail!("looking into pg_wal needs superuser or pg_monitor"),
    }
}

/// Segments named after the one being written.
pub fn segments_ahead(db: &mut Db) -> Result<i64> {
    Ok(ready(db)?.segments_ahead)
}

/// Use up the ready segments until at most as many as `min_wal_size` keeps are left;
/// the segments ahead before and after.
pub fn empty(db: &mut Db) -> Result<(i64, i64)> {
    let start = ready(db)?;
    let before = start.segments_ahead;
    let min_wal_size: i64 = db
        .client()
        .query_one("SELECT pg_size_bytes(current_setting('min_wal_size'))", &[])?
        .get(0);
    let keep = min_wal_size / start.segment_bytes;
    for round in 0..MAX_ROUNDS {
        let ahead = segments_ahead(db)?;
        if round >= MIN_ROUNDS && ahead <= keep {
            return Ok((before, ahead));
        }
        db.client().batch_execute("SELECT pg_switch_wal()")?;
        db.client().batch_execute("CHECKPOINT")?;
    }
    bail!(
        "pg_wal still held {} segments ahead after {MAX_ROUNDS} checkpoints (min_wal_size \
         keeps {keep})",
        segments_ahead(db)?
    )
}

/// `--prepare-wal MB`: what an admin can do before a backfill on a quiet Hydra (README,
/// "WAL segments"): keep `mb` of segments (`min_wal_size`, set for the whole server and
/// reloaded), have PostgreSQL create them now (a switch to a new segment after a little
/// WAL, over and over: each creation holds Hydra's commits as it will during the walk,
/// but all of them in a few seconds), then a checkpoint, which recycles them as ready
/// segments. The segments ahead before and after. [`reset_min_wal_size`] undoes the
/// setting.
pub fn prepare(db: &mut Db, mb: u64) -> Result<(i64, i64)> {
    let start = ready(db)?;
    set_min_wal_size(db, Some(mb))?;
    let segment = start.segment_bytes;
    let want = (mb as i64) << 20;
    let mut created = 0;
    while created < want {
        db.client().batch_execute(
            "SELECT pg_logical_emit_message(false, 'hydra-upgrade-bench', 'prepare');
             SELECT pg_switch_wal()",
        )?;
        created += segment;
    }
    db.client().batch_execute("CHECKPOINT")?;
    Ok((start.segments_ahead, segments_ahead(db)?))
}

/// `min_wal_size` back to the server's own.
pub fn reset_min_wal_size(db: &mut Db) -> Result<()> {
    set_min_wal_size(db, None)
}

fn set_min_wal_size(db: &mut Db, mb: Option<u64>) -> Result<()> {
    let sql = match mb {
        Some(mb) => format!("ALTER SYSTEM SET min_wal_size = '{mb}MB'"),
        None => "ALTER SYSTEM RESET min_wal_size".to_owned(),
    };
    // One statement each: ALTER SYSTEM refuses to run inside a transaction block.
    db.client().batch_execute(&sql)?;
    db.client().batch_execute("SELECT pg_reload_conf()")?;
    // Every process reads its configuration again when it next gets to it; the
    // checkpointer, which uses this setting, at once.
    let Some(mb) = mb else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now: String = db
            .client()
            .query_one(
                "SELECT setting FROM pg_settings WHERE name = 'min_wal_size'",
                &[],
            )?
            .get(0);
        if now == mb.to_string() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("min_wal_size is still {now} MB 10 s after a reload (wanted {mb})");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
