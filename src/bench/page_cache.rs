//! `--warm-copy`: before a writer run, the copy in the OS page cache and the template out
//! of it; `--template-out-of-cache`: only the template out of it.
//!
//! At 10M builds the bench's cluster holds the template (6.9 GB) and the run's copy of it
//! (6.9 GB), and `wal prepare` then adds 8.6 GB of WAL segments: more than this machine's
//! page cache keeps beside everything else, so parts of the copy may be read from the
//! disk during the run, by our walk and by the writer, next to the WAL's syncs. A Hydra's
//! server has one database, and one with enough memory keeps it cached. This drops the
//! clean pages of the page cache (`/proc/sys/vm/drop_caches`, as root; the copy's were
//! made clean by the bench's `CHECKPOINT` after `CREATE DATABASE`, the template's were
//! never dirty) and reads every relation of the copy back in with `pg_prewarm(..., 'read')`,
//! which goes through the OS cache and leaves PostgreSQL's own buffers alone.
//!
//! Measured at 10M (BENCHMARKS.md, "The copy in the page cache"): warmed so, the writer's
//! p99 during our walk was about twice as high, not lower; a diagnostic, off by default.
//! Why ("Where the CPU time goes during the walk"): the read-back leaves the copy in the
//! kernel's large page-cache folios, and PostgreSQL's 8 kB writes into those cost the
//! kernel (`ext4_block_write_begin`, ext4's writeback) far more CPU.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::proc_stat;
use crate::db::Db;

/// What warming read.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Warmed {
    pub mb: f64,
    pub seconds: f64,
    /// The machine's file pages in the page cache held in huge (PMD-sized, 2 MB on
    /// x86-64) folios right after the read-back (`/proc/meminfo`'s `FileHugePages`), the
    /// copy's among them: the large folios PostgreSQL's 8 kB writes then go into
    /// (smaller large folios are not counted anywhere in `/proc/meminfo`).
    pub huge_mb: f64,
}

/// Drop the page cache's clean pages, then read the copy `db` is connected to into it.
pub fn warm(db: &mut Db) -> Result<Warmed> {
    let started = Instant::now();
    std::fs::write("/proc/sys/vm/drop_caches", "1").context(
        "--warm-copy: writing 1 to /proc/sys/vm/drop_caches (needs root, and a kernel that \
         lets this machine drop its page cache)",
    )?;
    db.client()
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        .context("--warm-copy needs the pg_prewarm extension (PostgreSQL's contrib)")?;
    let bytes: i64 = db
        .client()
        .query_one(
            "SELECT coalesce(sum(pg_prewarm(c.oid, 'read')), 0)::bigint
                    * current_setting('block_size')::bigint
               FROM pg_class c
              WHERE c.relkind IN ('r', 'i', 't', 'm') AND c.relpersistence = 'p'",
            &[],
        )?
        .get(0);
    let seconds = started.elapsed().as_secs_f64();
    Ok(Warmed {
        mb: bytes as f64 / 1_048_576.0,
        seconds,
        huge_mb: proc_stat::meminfo_now_kb("FileHugePages").unwrap_or(0) as f64 / 1024.0,
    })
}

/// What [`evict`] let go of.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Evicted {
    /// The template's files and their size on disk.
    pub files: usize,
    pub mb: f64,
    /// `/proc/meminfo`'s `Cached` before less after: what the page cache gave up (the
    /// whole machine's, so other activity in the same moment counts too).
    pub released_mb: f64,
}

/// `--template-out-of-cache`: ask the kernel to drop the page cache's pages of every file
/// under `dir` (the template database's directory, `base/OID`), with
/// `posix_fadvise(POSIX_FADV_DONTNEED)` on the whole file. Only the template's pages go:
/// the copy's stay as the run left them (in the small folios PostgreSQL's own writes
/// made; compare `--warm-copy`, whose read-back leaves large ones). The template's pages
/// are clean (nothing writes to it once built), so the kernel drops them all; it needs no
/// root, only read access to the files.
pub fn evict(dir: &Path) -> Result<Evicted> {
    let cached_mb = || proc_stat::meminfo_now_kb("Cached").map(|kb| kb as f64 / 1024.0);
    let before = cached_mb();
    let (mut files, mut bytes) = (0usize, 0u64);
    let listing = std::fs::read_dir(dir)
        .with_context(|| format!("--template-out-of-cache: listing {}", dir.display()))?;
    for entry in listing {
        let path = entry?.path();
        let file = std::fs::File::open(&path)
            .with_context(|| format!("--template-out-of-cache: opening {}", path.display()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            continue;
        }
        nix::fcntl::posix_fadvise(
            file.as_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .with_context(|| {
            format!(
                "--template-out-of-cache: posix_fadvise(DONTNEED) on {}",
                path.display()
            )
        })?;
        files += 1;
        bytes += meta.len();
    }
    Ok(Evicted {
        files,
        mb: bytes as f64 / 1_048_576.0,
        released_mb: before
            .zip(cached_mb())
            .map_or(0.0, |(b, a)| (b - a).max(0.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Pages of `path` in the page cache, by `mincore` over a mapping of it (the mapping
    /// is never touched, so it brings nothing in).
    fn resident_pages(path: &Path) -> usize {
        let file = std::fs::File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file we hold open, unmapped before
        // returning; mincore writes one byte per page into a vector of that many bytes.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    /// The file system of `dir` when its files' pages are not the page cache's to drop:
    /// tmpfs and ramfs pages are the files themselves, ZFS caches in its own ARC. (A Nix
    /// build directory can be on any of them.)
    fn pages_kept_by_file_system(dir: &Path) -> Option<&'static str> {
        // statfs(2)'s f_type of each (linux/magic.h; ZFS's own).
        match nix::sys::statfs::statfs(dir).unwrap().filesystem_type().0 as i64 {
            0x0102_1994 => Some("tmpfs"),
            0x8584_58f6 => Some("ramfs"),
            0x2fc1_2fc1 => Some("zfs"),
            _ => None,
        }
    }

    /// Files written through the page cache and made clean, then evicted: none of their
    /// pages is cached any more, and their data stay. (In the source tree, not the
    /// temporary directory: a tmpfs there would keep every page in memory. Where the
    /// source tree itself is on such a file system, as a Nix build's can be, only the
    /// counts and the data are checked, and the test says so.)
    #[test]
    fn a_directorys_files_leave_the_page_cache_and_keep_their_data() {
        let dir = tempfile::Builder::new()
            .prefix(".page-cache-test.")
            .tempdir_in(env!("CARGO_MANIFEST_DIR"))
            .unwrap();
        let data = vec![7u8; 4 << 20];
        let names = ["16384", "16384_fsm", "16385.1"];
        for name in names {
            let mut f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
        }
        let cached = |name: &str| resident_pages(&dir.path().join(name));
        let kept_by = pages_kept_by_file_system(dir.path());
        assert!(
            kept_by.is_some() || names.iter().any(|n| cached(n) > 0),
            "nothing cached to begin with"
        );
        let evicted = evict(dir.path()).unwrap();
        assert_eq!((evicted.files, evicted.mb), (3, 12.0));
        match kept_by {
            Some(fs) => eprintln!(
                "the eviction itself is not checked: {} is on {fs}, whose pages the page \
                 cache does not drop",
                dir.path().display()
            ),
            None => {
                for name in names {
                    assert_eq!(cached(name), 0, "{name} still cached");
                }
            }
        }
        assert_eq!(std::fs::read(dir.path().join("16385.1")).unwrap(), data);
        let missing = evict(&dir.path().join("nothing")).unwrap_err();
        assert!(format!("{missing:#}").contains("listing"), "{missing:#}");
    }
}
