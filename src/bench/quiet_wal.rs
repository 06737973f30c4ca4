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
