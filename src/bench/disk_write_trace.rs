//! `--disk-write-trace`: which files the data disk's writes during our walk went to, and
//! how often each block was written.
//!
//! At 10M builds the walk wrote 15-23 GB to the disk the data lives on, two to three
//! times Builds' 7.2 GB with its indexes (BENCHMARKS.md, "The template out of the page
//! cache, and the disks counted"); `/proc/diskstats` says how much, not what. This enables
//! the kernel's `block:block_rq_issue` tracepoint in a tracing instance of its own
//! (tracefs; root) for the span, keeps every write request sent to the data directory's
//! disk (sector and length), and at the end maps them to files by their physical extents
//! (`filefrag -e`, the `FIEMAP` ioctl): for each relation of the run's database, the MB
//! written, the MB of distinct blocks written and so how many times a block was written on
//! average; the cluster's other directories (`pg_wal`, `pg_xact`, ...) by directory; what
//! no file holds at the end (the filesystem's journal and metadata, files removed in the
//! span) as one line. Beside it, PostgreSQL's own count (`pg_stat_bgwriter`): checkpoints
//! and the buffers written by the checkpointer, the background writer and the backends.
//! A diagnostic, off by default.
//!
//! Blocks are 4 kB (ext4's); a file's extents are read once at the end of the span, so a
//! block that changed owner within it is counted for its owner at the end.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::db::Db;
use crate::exec::Cmd;

/// Sectors (512 bytes) in one filesystem block (4 kB).
const BLOCK_SECTORS: u64 = 8;

/// One write request to the disk: first sector and sectors.
type Write = (u64, u64);

/// A trace under way: the tracing instance and the thread reading it. Dropped without
/// [`Tracer::stop`] (a run that failed meanwhile), it still ends the trace and removes
/// the instance, so that no tracepoint stays enabled after the bench.
pub struct Tracer {
    instance: PathBuf,
    stop: Arc<AtomicBool>,
    /// Taken by [`Tracer::end`].
    reader: Option<std::thread::JoinHandle<Result<Vec<Write>>>>,
    disk: String,
    /// Added to a file's physical sectors to make them the disk's (a partition's start).
    offset: u64,
}

/// The writes a stopped trace kept, to be given to files with [`Writes::attribute`].
pub struct Writes {
    writes: Vec<Write>,
    disk: String,
    offset: u64,
    lost_events: u64,
}

/// `pg_stat_bgwriter`'s counters at one moment (PostgreSQL 10-16).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BgWriter {
    pub checkpoints_timed: i64,
    pub checkpoints_requested: i64,
    pub buffers_checkpoint: i64,
    pub buffers_clean: i64,
    pub buffers_backend: i64,
}

impl BgWriter {
    /// Now; `None` where the view has other columns (PostgreSQL 17 and later).
    pub fn read(db: &mut Db) -> Option<BgWriter> {
        let r = db
            .client()
            .query_one(
                "SELECT checkpoints_timed, checkpoints_req, buffers_checkpoint, buffers_clean, buffers_backend FROM pg_stat_bgwriter",
                &[],
            )
            .ok()?;
        Some(BgWriter {
            checkpoints_timed: r.get(0),
            checkpoints_requested: r.get(1),
            buffers_checkpoint: r.get(2),
            buffers_clean: r.get(3),
            buffers_backend: r.get(4),
        })
    }

    pub fn since(&self, earlier: &BgWriter) -> BgWriter {
        BgWriter {
            checkpoints_timed: self.checkpoints_timed - earlier.checkpoints_timed,
            checkpoints_requested: self.checkpoints_requested - earlier.checkpoints_requested,
            buffers_checkpoint: self.buffers_checkpoint - earlier.buffers_checkpoint,
            buffers_clean: self.buffers_clean - earlier.buffers_clean,
            buffers_backend: self.buffers_backend - earlier.buffers_backend,
        }
    }
}

/// One line of the result: a relation (or a directory, or what no file holds), the MB
/// written to it and the MB of distinct blocks among them.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub written_mb: f64,
    /// `None` for what no file holds.
    pub distinct_mb: Option<f64>,
}

/// What the trace found over the span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Traced {
    pub disk: String,
    pub requests: u64,
    pub written_mb: f64,
    /// Largest first.
    pub targets: Vec<Target>,
    /// Events the kernel's buffer dropped before they were read (0 when all were read).
    pub lost_events: u64,
    /// PostgreSQL's count over the span (the caller's [`BgWriter::read`] before and after),
    /// if its `pg_stat_bgwriter` has the columns.
    pub bgwriter: Option<BgWriter>,
}

/// The tracefs mount: `/sys/kernel/tracing`, or the older place under debugfs.
fn tracefs() -> Result<PathBuf> {
    let mounted = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("instances").is_dir())
    };
    if let Some(p) = mounted() {
        return Ok(p);
    }
    // Root on a machine that has not mounted it (a fresh container): mount it, as `perf`
    // and `trace-cmd` do; it only exposes the kernel's tracing, which root can use anyway.
    let mount_point = Path::new("/sys/kernel/tracing");
    if nix::unistd::geteuid().is_root() && mount_point.is_dir() {
        Cmd::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(mount_point)
            .run()
            .context("--disk-write-trace needs tracefs, and mounting it failed")?;
    }
    mounted().context(
        "--disk-write-trace needs tracefs: run as root, and mount it if it is not \
         (mount -t tracefs nodev /sys/kernel/tracing)",
    )
}

/// The disk the directory `dir` lives on, as `/proc/diskstats` and the tracepoint name it
/// (`MAJOR,MINOR` of the whole disk), and the sectors to add to a file's physical sectors
/// (the partition's start, 0 for a filesystem on a whole disk).
fn disk_of(dir: &Path) -> Result<(String, u64)> {
    let dev = std::fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        bail!(
            "{} is not on a block device ({major}:{minor}: tmpfs, overlay or a network filesystem); --disk-write-trace traces a disk",
            dir.display()
        );
    }
    match std::fs::read_to_string(sys.join("start")) {
        Ok(start) => {
            let parent = std::fs::read_to_string(sys.join("../dev"))
                .context("reading the partition's disk")?;
            let start: u64 = start.trim().parse().context("a partition's start")?;
            Ok((parent.trim().replace(':', ","), start))
        }
        Err(_) => Ok((format!("{major},{minor}"), 0)),
    }
}

/// Check before a long template that tracing works here and `filefrag` is installed.
pub fn check(data_dir: &Path) -> Result<()> {
    let root = tracefs()?;
    if !root.join("events/block/block_rq_issue").is_dir() {
        bail!("this kernel has no block:block_rq_issue tracepoint (--disk-write-trace)");
    }
    disk_of(data_dir)?;
    Cmd::new("filefrag")
        .arg("-V")
        .run()
        .context("--disk-write-trace needs filefrag (Debian: e2fsprogs)")?;
    Ok(())
}

/// Tracing instances this process has made: each its own name.
static INSTANCES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Start tracing the writes to the disk `data_dir` is on.
pub fn start(data_dir: &Path) -> Result<Tracer> {
    let (disk, offset) = disk_of(data_dir)?;
    let instance = tracefs()?.join("instances").join(format!(
        "hydra-upgrade-bench-{}-{}",
        std::process::id(),
        INSTANCES.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&instance)
        .with_context(|| format!("creating the tracing instance {}", instance.display()))?;
    let event = instance.join("events/block/block_rq_issue");
    let setup = || -> Result<()> {
        std::fs::write(instance.join("buffer_size_kb"), "8192")?;
        // Writes only (the kernel keeps the rest out of the buffer); the disk is picked
        // when the lines are read.
        std::fs::write(event.join("filter"), "rwbs ~ \"*W*\"")?;
        std::fs::write(event.join("enable"), "1")?;
        Ok(())
    };
    if let Err(e) = setup() {
        std::fs::remove_dir(&instance).ok();
        return Err(e.context("setting up the tracing instance"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pipe, stop, disk) = (instance.join("trace_pipe"), stop.clone(), disk.clone());
        std::thread::Builder::new()
            .name("disk-write-trace".to_owned())
            .spawn(move || read_pipe(&pipe, &stop, &disk))?
    };
    Ok(Tracer {
        instance,
        stop,
        reader: Some(reader),
        disk,
        offset,
    })
}

/// Read the instance's `trace_pipe` (without blocking, so that a stop is seen) until
/// told to stop and nothing is left; the writes to `disk`.
fn read_pipe(pipe: &Path, stop: &AtomicBool, disk: &str) -> Result<Vec<Write>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(pipe)
        .with_context(|| format!("opening {}", pipe.display()))?;
    let (mut writes, mut pending, mut buf) = (Vec::new(), Vec::new(), vec![0u8; 1 << 16]);
    loop {
        // Whether the stop came before this read: then a read that finds nothing has
        // seen every event traced before the stop. (A stop looked at only after an empty
        // read could have come with the last events, traced after that read.)
        let stopping = stop.load(Ordering::SeqCst);
        // Nothing to read now: tracefs answers an empty pipe with EAGAIN; a read of 0 bytes
        // (end of file) is taken the same way, so that the loop neither spins nor outlives
        // `stop`.
        let idle = match file.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                let end = pending
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                for line in String::from_utf8_lossy(&pending[..end]).lines() {
                    writes.extend(write_of(line, disk));
                }
                pending.drain(..end);
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(e).context("reading the trace"),
        };
        if idle {
            if stopping {
                return Ok(writes);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A `block_rq_issue` line's write to `disk`: `... block_rq_issue: 254,0 W 8192 () 40511488
/// + 16 none,0,0 [comm]`.
fn write_of(line: &str, disk: &str) -> Option<Write> {
    let rest = line.split_once("block_rq_issue: ")?.1;
    let mut words = rest.split_whitespace();
    if words.next()? != disk || !words.next()?.contains('W') {
        return None;
    }
    let words: Vec<&str> = words.collect();
    let plus = words.iter().position(|w| *w == "+")?;
    let sector = words.get(plus.checked_sub(1)?)?.parse().ok()?;
    let sectors: u64 = words.get(plus + 1)?.parse().ok()?;
    (sectors > 0).then_some((sector, sectors))
}

/// A file's extent on the disk: first sector, sectors, and a counter per block.
struct Extent {
    start: u64,
    sectors: u64,
    file: usize,
    counts: Vec<u32>,
}

/// `filefrag -e -b512`'s extents as (physical first sector, sectors), those with no
/// place on the disk yet (delayed allocation) left out.
fn extents_of(filefrag: &str) -> Vec<(u64, u64)> {
    filefrag
        .lines()
        .filter(|l| !l.contains("unknown_loc") && !l.contains("delalloc"))
        .filter_map(|l| {
            let mut parts = l.split(':').map(str::trim);
            parts.next()?.parse::<u64>().ok()?;
            let _logical = parts.next()?;
            let physical = parts.next()?;
            let length: u64 = parts.next()?.parse().ok()?;
            let start: u64 = physical.split("..").next()?.trim().parse().ok()?;
            Some((start, length))
        })
        .collect()
}

/// Add the writes to the extents' counters; the sectors no extent holds.
fn count(writes: &[Write], extents: &mut [Extent]) -> u64 {
    extents.sort_by_key(|e| e.start);
    let mut outside = 0;
    for &(sector, sectors) in writes {
        let end = sector + sectors;
        let mut covered = 0;
        let first = extents.partition_point(|e| e.start + e.sectors <= sector);
        for e in extents[first..].iter_mut().take_while(|e| e.start < end) {
            let (from, to) = (sector.max(e.start), end.min(e.start + e.sectors));
            covered += to - from;
            for b in (from - e.start) / BLOCK_SECTORS..(to - e.start).div_ceil(BLOCK_SECTORS) {
                e.counts[b as usize] += 1;
            }
        }
        outside += sectors - covered;
    }
    outside
}

impl Tracer {
    /// Stop tracing; the writes it kept.
    pub fn stop(mut self) -> Result<Writes> {
        let (writes, lost_events) = self.end()?;
        Ok(Writes {
            writes,
            disk: std::mem::take(&mut self.disk),
            offset: self.offset,
            lost_events,
        })
    }

    /// Disable the event, let the reader drain the buffer and end, count what the kernel
    /// dropped, remove the instance (its `trace_pipe` closed by then); once.
    fn end(&mut self) -> Result<(Vec<Write>, u64)> {
        let reader = self.reader.take().context("the trace was ended already")?;
        self.stop.store(true, Ordering::SeqCst);
        let disabled = std::fs::write(
            self.instance.join("events/block/block_rq_issue/enable"),
            "0",
        );
        let writes = reader
            .join()
            .map_err(|_| anyhow::anyhow!("the trace's thread panicked"));
        let lost_events = lost_events(&self.instance);
        if let Err(e) = remove_instance(&self.instance) {
            crate::errln!("warning: {e:#}");
        }
        disabled.context("ending the trace")?;
        Ok((writes??, lost_events))
    }
}

/// Remove a tracing instance. The kernel refuses (EBUSY) while any of its files is open,
/// and a child that another thread forks holds a copy of the reader's `trace_pipe` until
/// it execs (`O_CLOEXEC`): a moment, but a removal right after the reader ends can fall
/// in it (one `.ci/run` did). So a busy instance is retried for a while.
fn remove_instance(instance: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(instance) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "removing the tracing instance {0}: remove it once nothing reads it \
                         (rmdir {0})",
                        instance.display()
                    )
                });
            }
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.reader.is_some() {
            self.end().ok();
        }
    }
}

impl Writes {
    /// The writes given to `files` (a name for each, several files may share one) by
    /// the files' extents now.
    pub fn attribute(&self, files: &[(String, PathBuf)]) -> Result<Traced> {
        let mut names: Vec<&String> = Vec::new();
        for (name, _) in files {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let mut extents = Vec::new();
        for (name, path) in files {
            let out = match Cmd::new("filefrag")
                .args(["-e", "-b512"])
                .arg(path.as_os_str())
                .run()
            {
                Ok(out) => out,
                // Removed since it was listed (a WAL segment, a dropped relation).
                Err(_) if !path.exists() => continue,
                Err(e) => return Err(e),
            };
            let file = names.iter().position(|n| *n == name).unwrap_or(0);
            for (start, sectors) in extents_of(&out.stdout) {
                extents.push(Extent {
                    start: start + self.offset,
                    sectors,
                    file,
                    counts: vec![0; sectors.div_ceil(BLOCK_SECTORS) as usize],
                });
            }
        }
        let outside = count(&self.writes, &mut extents);
        let mb = |sectors: u64| sectors as f64 * 512.0 / 1e6;
        let mut by_name: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
        for e in &extents {
            let (written, distinct) = by_name.entry(e.file).or_default();
            *written += e.counts.iter().map(|&c| u64::from(c)).sum::<u64>() * BLOCK_SECTORS;
            *distinct += e.counts.iter().filter(|&&c| c > 0).count() as u64 * BLOCK_SECTORS;
        }
        let mut targets: Vec<Target> = by_name
            .into_iter()
            .filter(|(_, (w, _))| *w > 0)
            .map(|(i, (w, d))| Target {
                name: names[i].clone(),
                written_mb: mb(w),
                distinct_mb: Some(mb(d)),
            })
            .collect();
        if outside > 0 {
            targets.push(Target {
                name: "no file of the cluster (journal, metadata, files removed)".to_owned(),
                written_mb: mb(outside),
                distinct_mb: None,
            });
        }
        targets.sort_by(|a, b| b.written_mb.total_cmp(&a.written_mb));
        Ok(Traced {
            disk: self.disk.clone(),
            requests: self.writes.len() as u64,
            written_mb: mb(self.writes.iter().map(|w| w.1).sum()),
            targets,
            lost_events: self.lost_events,
            bgwriter: None,
        })
    }
}

/// The events the instance's per-CPU buffers overran (dropped unread).
fn lost_events(instance: &Path) -> u64 {
    let Ok(cpus) = std::fs::read_dir(instance.join("per_cpu")) else {
        return 0;
    };
    cpus.filter_map(|c| std::fs::read_to_string(c.ok()?.path().join("stats")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("overrun:")?.trim().parse::<u64>().ok())
        })
        .sum()
}

/// The cluster's files on the data disk, each named: a relation of the database whose
/// directory is `db_dir` by its name (`relations`: file node and name), its free space
/// and visibility maps apart; any other file by its directory under `data_dir`. Files on
/// another filesystem (a `pg_wal` linked to a directory elsewhere, `--wal-dir`) are left
/// out: their writes are not to the traced disk, and `filefrag` cannot map a tmpfs file.
pub fn files_of(
    data_dir: &Path,
    db_dir: &Path,
    relations: &[(u32, String)],
) -> Result<Vec<(String, PathBuf)>> {
    let dev = std::fs::metadata(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .dev();
    let mut files = Vec::new();
    let mut pending = vec![data_dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let entry = entry?;
            let path = entry.path();
            // Followed, so that a linked `pg_wal` is read; gone meanwhile (a WAL segment
            // removed), left out.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                let name = if dir == db_dir {
                    relation_of(&entry.file_name().to_string_lossy(), relations)
                } else {
                    None
                };
                let name = name.unwrap_or_else(|| {
                    let top = path
                        .strip_prefix(data_dir)
                        .ok()
                        .and_then(|p| p.components().next())
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if dir == db_dir {
                        "other files of the database".to_owned()
                    } else if top == "base" {
                        "base (other databases)".to_owned()
                    } else {
                        top
                    }
                });
                files.push((name, path));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A relation file's name (`16384`, `16384.2`, `16384_fsm`, `16384_vm.1`) as the
/// relation's, its free space and visibility maps marked.
fn relation_of(file: &str, relations: &[(u32, String)]) -> Option<String> {
    let base = file.split('.').next()?;
    let (node, fork) = match base.split_once('_') {
        Some((node, fork)) => (node, Some(fork)),
        None => (base, None),
    };
    let node: u32 = node.parse().ok()?;
    let name = &relations.iter().find(|(n, _)| *n == node)?.1;
    Some(match fork {
        None => name.clone(),
        Some(fork) => format!("{name} ({fork})"),
    })
}

/// The relations of the database `db` is connected to: file node and name.
pub fn relations(db: &mut Db) -> Result<Vec<(u32, String)>> {
    Ok(db
        .client()
        .query(
            "SELECT pg_relation_filenode(oid)::bigint, relname::text FROM pg_class WHERE pg_relation_filenode(oid) IS NOT NULL",
            &[],
        )?
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get(1)))
        .collect())
}

impl Traced {
    /// The result in a few lines: the disk's writes, each target's MB and times per
    /// block (the largest [`TOP`] and the rest summed), PostgreSQL's count.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "disk {}: {} write requests, {:.0} MB{}",
            self.disk,
            self.requests,
            self.written_mb,
            if self.lost_events > 0 {
                format!(" ({} events lost: the figures are low)", self.lost_events)
            } else {
                String::new()
            }
        );
        let (top, rest) = self.targets.split_at(self.targets.len().min(TOP));
        for t in top {
            s.push_str(&format!("\n      {}", t.describe()));
        }
        if !rest.is_empty() {
            let mb: f64 = rest.iter().map(|t| t.written_mb).sum();
            s.push_str(&format!("\n      {} more: {mb:.0} MB", rest.len()));
        }
        if let Some(b) = &self.bgwriter {
            s.push_str(&format!(
                "\n      PostgreSQL: {} checkpoints ({} timed, {} requested); buffers written by the checkpointer {}, the background writer {}, backends {} ({:.0} MB in all)",
                b.checkpoints_timed + b.checkpoints_requested,
                b.checkpoints_timed,
                b.checkpoints_requested,
                b.buffers_checkpoint,
                b.buffers_clean,
                b.buffers_backend,
                (b.buffers_checkpoint + b.buffers_clean + b.buffers_backend) as f64 * 8192.0 / 1e6
            ));
        }
        s
    }
}

/// How many targets a description names.
const TOP: usize = 12;

impl Target {
    fn describe(&self) -> String {
        match self.distinct_mb {
            None => format!("{}: {}", self.name, megabytes(self.written_mb)),
            Some(distinct) => format!(
                "{}: {}, {} of distinct blocks ({:.2} writes a block)",
                self.name,
                megabytes(self.written_mb),
                megabytes(distinct),
                self.written_mb / distinct
            ),
        }
    }
}

/// MB as a figure that does not read as nothing: one decimal below 10 MB.
fn megabytes(mb: f64) -> String {
    if mb < 10.0 {
        format!("{mb:.1} MB")
    } else {
        format!("{mb:.0} MB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A directory on a disk for a test that traces, or `None` (said on stderr) when
    /// not root. (In the source tree, not the temporary directory: a tmpfs there is no
    /// disk.)
    fn traced_dir(test: &str) -> Option<tempfile::TempDir> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("{test}: not run, tracing needs root");
            return None;
        }
        Some(
            tempfile::Builder::new()
                .prefix(".disk-write-trace-test.")
                .tempdir_in(env!("CARGO_MANIFEST_DIR"))
                .unwrap(),
        )
    }

    /// A real trace: a file's block written twice and a megabyte once, each synced, are
    /// found in that file with their counts. Needs root (tracefs is mounted if it is not);
    /// says so and returns when not root.
    #[test]
    fn a_files_writes_are_traced_to_it() {
        let Some(dir) = traced_dir("a_files_writes_are_traced_to_it") else {
            return;
        };
        let path = dir.path().join("16384");
        let file = std::fs::File::create(&path).unwrap();
        file.write_all_at(&vec![1u8; 4 << 20], 0).unwrap();
        file.sync_all().unwrap();
        check(dir.path()).unwrap();
        let tracer = start(dir.path()).unwrap();
        let instance = tracer.instance.clone();
        for _ in 0..2 {
            file.write_all_at(&[2u8; 8192], 0).unwrap();
            file.sync_all().unwrap();
        }
        file.write_all_at(&vec![3u8; 1 << 20], 2 << 20).unwrap();
        file.sync_all().unwrap();
        let writes = tracer.stop().unwrap();
        let traced = writes
            .attribute(&[("ours".to_owned(), path.clone())])
            .unwrap();
        let ours = traced.targets.iter().find(|t| t.name == "ours").unwrap();
        // 2 x 8 kB + 1 MB written, 8 kB + 1 MB of it distinct.
        assert_eq!(
            (ours.written_mb, ours.distinct_mb),
            (1.064960, Some(1.056768)),
            "{}",
            traced.describe()
        );
        assert_eq!(traced.lost_events, 0);
        assert!(traced.written_mb >= ours.written_mb);
        assert!(
            !instance.exists(),
            "the tracing instance {} is left behind",
            instance.display()
        );
    }

    #[test]
    fn a_write_request_is_read_from_its_trace_line() {
        let line = "     kworker/u8:2-123     [001] ..... 47115.186720: block_rq_issue: 254,0 WS 8192 () 40511488 + 16 none,0,0 [kworker/u8:2]";
        assert_eq!(write_of(line, "254,0"), Some((40511488, 16)));
        assert_eq!(write_of(line, "253,0"), None, "another disk");
        let read = line.replace(" WS ", " R ");
        assert_eq!(write_of(&read, "254,0"), None, "a read");
        let flush = "  jbd2/vda-8-99 [000] ..... 1.0: block_rq_issue: 254,0 FWS 0 () 0 + 0 none,0,0 [jbd2/vda-8]";
        assert_eq!(write_of(flush, "254,0"), None, "a flush carries no sectors");
    }

    /// A pipe that reads as ended (0 bytes) ends the reading once told to stop, with
    /// what it held, instead of spinning on it for ever.
    #[test]
    fn a_read_of_nothing_ends_the_reading_once_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let pipe = dir.path().join("trace_pipe");
        let line = "kworker/u8:2-123 [001] ..... 1.0: block_rq_issue: 254,0 W 8192 () 64 + 16 none,0,0 [kworker/u8:2]";
        std::fs::write(&pipe, format!("{line}\n{}\n", line.replace(" W ", " R "))).unwrap();
        let (sent, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let stop = AtomicBool::new(true);
            sent.send(read_pipe(&pipe, &stop, "254,0").unwrap())
                .unwrap();
        });
        let writes = received
            .recv_timeout(Duration::from_secs(10))
            .expect("read_pipe still reading 10 s after a stop, at the file's end");
        assert_eq!(writes, vec![(64, 16)]);
    }

    #[test]
    fn filefrags_extents_are_read_and_unplaced_ones_left_out() {
        let out = "Filesystem type is: ef53\nFile size of f is 3145728 (6144 blocks of 512 bytes)\n ext:     logical_offset:        physical_offset: length:   expected: flags:\n   0:        0..    4095:  324091904.. 324095999:   4096:            \n   1:     4096..    6143:  500000000.. 500002047:   2048:  324096000: last,eof\n   2:     6144..    8191:          0..      2047:   2048:             unknown_loc,delalloc,eof\nf: 2 extents found\n";
        assert_eq!(extents_of(out), vec![(324091904, 4096), (500000000, 2048)]);
    }

    #[test]
    fn writes_are_counted_per_block_and_what_no_file_holds_apart() {
        let extent = |start, sectors, file| Extent {
            start,
            sectors,
            file,
            counts: vec![0; (sectors / BLOCK_SECTORS) as usize],
        };
        let mut extents = vec![extent(1000, 64, 1), extent(0, 32, 0)];
        // Block 0 of the first file twice, a request across the end of file 0's extent
        // into no file, one across both of file 1's first blocks.
        let writes = [(0, 8), (0, 8), (24, 16), (1000, 16)];
        assert_eq!(count(&writes, &mut extents), 8);
        let by_start: Vec<(u64, Vec<u32>)> = extents
            .iter()
            .map(|e| (e.start, e.counts.clone()))
            .collect();
        assert_eq!(
            by_start,
            vec![(0, vec![2, 0, 0, 1]), (1000, vec![1, 1, 0, 0, 0, 0, 0, 0])]
        );
    }

    /// A tracer dropped without `stop` (a run that failed) still removes its instance.
    #[test]
    fn a_dropped_trace_leaves_no_instance_behind() {
        let Some(dir) = traced_dir("a_dropped_trace_leaves_no_instance_behind") else {
            return;
        };
        let tracer = start(dir.path()).unwrap();
        let instance = tracer.instance.clone();
        assert!(instance.is_dir());
        drop(tracer);
        assert!(!instance.exists(), "{} left behind", instance.display());
    }

    /// An instance whose file someone else holds open for a moment (as a child forked
    /// while the reader had `trace_pipe` open holds that until it execs) is still removed.
    #[test]
    fn an_instance_held_open_for_a_moment_is_still_removed() {
        let Some(dir) = traced_dir("an_instance_held_open_for_a_moment_is_still_removed") else {
            return;
        };
        let tracer = start(dir.path()).unwrap();
        let instance = tracer.instance.clone();
        let held = std::fs::File::open(instance.join("tracing_on")).unwrap();
        let let_go = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        tracer.stop().unwrap();
        let_go.join().unwrap();
        assert!(!instance.exists(), "{} left behind", instance.display());
    }

    /// A data directory's files by name: the database's relations and their forks, other
    /// databases, other directories; a `pg_wal` linked to another filesystem (`/dev/shm`,
    /// where there is one and the source tree is not on it) left out, one on the same
    /// filesystem kept.
    #[test]
    fn a_clusters_files_are_named_and_other_filesystems_left_out() {
        let data = tempfile::Builder::new()
            .prefix(".disk-write-trace-test.")
            .tempdir_in(env!("CARGO_MANIFEST_DIR"))
            .unwrap();
        let d = data.path();
        for f in [
            "base/5/16384",
            "base/5/16384_vm",
            "base/5/16384.1",
            "base/5/PG_VERSION",
            "base/1/1259",
            "global/1262",
            "pg_xact/0000",
        ] {
            std::fs::create_dir_all(d.join(f).parent().unwrap()).unwrap();
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let shm = Path::new("/dev/shm");
        let device = |p: &Path| std::fs::metadata(p).unwrap().dev();
        let elsewhere =
            (shm.is_dir() && device(shm) != device(d)).then(|| tempfile::tempdir_in(shm).unwrap());
        let wal = elsewhere
            .as_ref()
            .map_or(d.join("wal-here"), |t| t.path().to_owned());
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(wal.join("000000010000000000000001"), b"x").unwrap();
        std::os::unix::fs::symlink(&wal, d.join("pg_wal")).unwrap();
        let rels = vec![(16384, "builds".to_owned())];
        let names: Vec<(String, String)> = files_of(d, &d.join("base/5"), &rels)
            .unwrap()
            .into_iter()
            .map(|(n, p)| (n, p.strip_prefix(d).unwrap().display().to_string()))
            .collect();
        let mut expected: Vec<(&str, &str)> = vec![
            ("base (other databases)", "base/1/1259"),
            ("builds", "base/5/16384"),
            ("builds", "base/5/16384.1"),
            ("builds (vm)", "base/5/16384_vm"),
            ("global", "global/1262"),
            ("other files of the database", "base/5/PG_VERSION"),
            ("pg_xact", "pg_xact/0000"),
        ];
        if elsewhere.is_none() {
            // The same filesystem: the segment is found under both names it has.
            expected.push(("pg_wal", "pg_wal/000000010000000000000001"));
            expected.push(("wal-here", "wal-here/000000010000000000000001"));
        }
        expected.sort();
        let expected: Vec<(String, String)> = expected
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn relation_files_are_named_by_relation_and_fork() {
        let rels = vec![
            (16384, "builds".to_owned()),
            (16390, "indexbuildsonjob".to_owned()),
        ];
        assert_eq!(relation_of("16384", &rels).as_deref(), Some("builds"));
        assert_eq!(relation_of("16384.2", &rels).as_deref(), Some("builds"));
        assert_eq!(
            relation_of("16384_vm", &rels).as_deref(),
            Some("builds (vm)")
        );
        assert_eq!(
            relation_of("16390_fsm.1", &rels).as_deref(),
            Some("indexbuildsonjob (fsm)")
        );
        assert_eq!(relation_of("99999", &rels), None);
        assert_eq!(relation_of("PG_VERSION", &rels), None);
    }

    #[test]
    fn a_description_names_the_largest_and_sums_the_rest() {
        let mut targets: Vec<Target> = (0..TOP + 2)
            .map(|i| Target {
                name: format!("r{i}"),
                written_mb: 100.0 - i as f64,
                distinct_mb: Some(50.0),
            })
            .collect();
        targets.push(Target {
            name: "no file".to_owned(),
            written_mb: 1.0,
            distinct_mb: None,
        });
        let t = Traced {
            disk: "254,0".to_owned(),
            requests: 3,
            written_mb: 1500.0,
            targets,
            lost_events: 0,
            bgwriter: None,
        };
        let d = t.describe();
        assert!(
            d.starts_with("disk 254,0: 3 write requests, 1500 MB"),
            "{d}"
        );
        assert!(
            d.contains("r0: 100 MB, 50 MB of distinct blocks (2.00 writes a block)"),
            "{d}"
        );
        assert!(d.contains("3 more: 176 MB"), "{d}");
        assert!(!d.contains("lost"), "{d}");
    }
}
