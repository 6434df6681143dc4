//! Partition views: each partition of an exposed disk is a window (disk, offset, length) on the
//! same `Image`, so every engine rule (read-only, degraded images, locking, statistics) applies
//! unchanged. This module keeps the windows of every disk, rescans a disk's table after writes
//! that touched it, and keeps the kernel's page cache of overlapping windows coherent.
//!
//! ```text
//!   disk.raw ───────────────────────────────────────────  ino D   (window 0..size)
//!   disk.partitions/1.raw   [=====]                        ino P1  (start1..start1+len1)
//!   disk.partitions/2.raw          [==========]            ino P2
//!   a write through any window invalidates the cached pages of every other window it overlaps
//! ```
//!
//! Inode numbers: partition directories and files live far above the tree's inodes. A partition
//! keeps its inode while its number, start and length stay the same across rescans; any change
//! gives it a new inode, and the old one answers ENXIO (its cached pages are dropped first).

pub mod table;

use crate::error::Result;
use crate::image::Image;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use table::{Partition, Table};

/// First inode of the partition directories (one per exposed disk file).
pub const DIR_INO_BASE: u64 = 1 << 40;
/// First inode of the partition files.
pub const FILE_INO_BASE: u64 = 1 << 41;
/// Writes into the first and last 64 KiB of a disk (MBR, GPT headers and entry arrays with 512 or
/// 4096-byte sectors) or into a sector the last scan read (EBRs) mark its table for a rescan.
const TABLE_EDGE: u64 = 64 << 10;
/// How long a request waits for the cache invalidations it caused. In practice they take
/// microseconds; the bound only matters when the kernel holds the other window's pages locked
/// for a request that no free worker can serve (then the data is still correct on disk and the
/// invalidation lands as soon as that request is answered).
const INVAL_WAIT: Duration = Duration::from_millis(250);

/// One partition file.
pub struct View {
    pub ino: u64,
    /// Index of the disk in `Partitions::disks`.
    pub disk: usize,
    pub part: Partition,
    /// Opened at least once: the kernel may hold pages of it.
    cached: AtomicBool,
}

/// The partitions of one exposed disk file (a top-level image or a snapshot view).
pub struct DiskParts {
    pub disk_ino: u64,
    /// Directory holding the disk file, and so its partition directory.
    pub parent: u64,
    pub dir_name: String,
    pub dir_ino: u64,
    pub image: Arc<Image>,
    state: RwLock<State>,
    /// A write touched the table since the last scan.
    dirty: AtomicBool,
    /// The disk file was opened: the kernel may hold pages of it.
    cached: AtomicBool,
    scanning: Mutex<()>,
}

#[derive(Default)]
struct State {
    table: Option<Table>,
    views: Vec<Arc<View>>,
}

impl DiskParts {
    pub fn table(&self) -> Option<Table> {
        self.state.read().table.clone()
    }
    pub fn views(&self) -> Vec<Arc<View>> {
        self.state.read().views.clone()
    }
}

/// Every disk's partitions, and the cache invalidator.
pub struct Partitions {
    disks: Vec<Arc<DiskParts>>,
    by_disk_ino: HashMap<u64, usize>,
    views: RwLock<HashMap<u64, Arc<View>>>,
    next_ino: AtomicU64,
    inval: Invalidator,
}

struct ImageDisk<'a>(&'a Image);

impl table::Disk for ImageDisk<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_internal(buf, off)
    }
}

/// The disk's logical sector size as its format records it (VHDX), else 512.
fn sector_hint(image: &Image) -> u64 {
    image
        .info()
        .details
        .get("logical_sector_size")
        .and_then(|v| v.as_u64())
        .filter(|&s| s == 4096)
        .unwrap_or(512)
}

/// The partition table of an image (for `imgfs info`); None without one or when unreadable.
pub fn scan_image(image: &Image) -> Option<Table> {
    table::scan(&ImageDisk(image), sector_hint(image))
        .map_err(|e| log::warn!("{}: partition table: {e}", image.path().display()))
        .ok()
        .flatten()
}

fn overlap(a: u64, alen: u64, b: u64, blen: u64) -> Option<(u64, u64)> {
    let start = a.max(b);
    let end = a.saturating_add(alen).min(b.saturating_add(blen));
    (start < end).then_some((start, end - start))
}

impl Partitions {
    /// No partitions at all (`--no-partitions`).
    pub fn disabled() -> Partitions {
        Partitions {
            disks: Vec::new(),
            by_disk_ino: HashMap::new(),
            views: RwLock::new(HashMap::new()),
            next_ino: AtomicU64::new(FILE_INO_BASE),
            inval: Invalidator::default(),
        }
    }

    /// `files`: (inode, parent directory inode, exposed name, image) of every exposed disk file.
    pub fn new(files: Vec<(u64, u64, String, Arc<Image>)>) -> Partitions {
        let mut p = Partitions::disabled();
        for (i, (ino, parent, name, image)) in files.into_iter().enumerate() {
            let stem = name.strip_suffix(".raw").unwrap_or(&name);
            p.disks.push(Arc::new(DiskParts {
                disk_ino: ino,
                parent,
                dir_name: format!("{stem}.partitions"),
                dir_ino: DIR_INO_BASE + i as u64,
                image,
                state: RwLock::new(State::default()),
                dirty: AtomicBool::new(false),
                cached: AtomicBool::new(false),
                scanning: Mutex::new(()),
            }));
            p.by_disk_ino.insert(ino, i);
        }
        for i in 0..p.disks.len() {
            p.rescan(i);
        }
        p
    }

    pub fn disks(&self) -> &[Arc<DiskParts>] {
        &self.disks
    }

    /// Start serving cache invalidations through the FUSE session's channel.
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        self.inval.start(notifier);
    }

    /// The partition directory with this inode, rescanned first if its table may have changed;
    /// None when the disk has (now) no table.
    pub fn dir(&self, ino: u64) -> Option<&Arc<DiskParts>> {
        let i = ino.checked_sub(DIR_INO_BASE)?;
        if ino >= FILE_INO_BASE {
            return None;
        }
        let d = self.disks.get(i as usize)?;
        self.settle(i as usize, false);
        d.state.read().table.is_some().then_some(d)
    }

    /// The partition directory named `name` in directory `parent`.
    pub fn dir_named(&self, parent: u64, name: &str) -> Option<&Arc<DiskParts>> {
        let d = self
            .disks
            .iter()
            .find(|d| d.parent == parent && d.dir_name == name)?;
        self.dir(d.dir_ino)
    }

    /// Partition directories to list in directory `parent`.
    pub fn dirs_in(&self, parent: u64) -> Vec<(u64, String)> {
        self.disks
            .iter()
            .filter(|d| d.parent == parent)
            .filter_map(|d| self.dir(d.dir_ino))
            .map(|d| (d.dir_ino, d.dir_name.clone()))
            .collect()
    }

    pub fn view(&self, ino: u64) -> Option<Arc<View>> {
        self.views.read().get(&ino).cloned()
    }

    pub fn disk_of(&self, view: &View) -> &Arc<DiskParts> {
        &self.disks[view.disk]
    }

    /// An inode that named a partition file (now or before a rescan removed it).
    pub fn is_file_ino(ino: u64) -> bool {
        ino >= FILE_INO_BASE
    }

    /// The file `ino` (a disk or a partition) was opened: from now on its pages may be cached.
    pub fn opened(&self, ino: u64) {
        if let Some(v) = self.view(ino) {
            v.cached.store(true, Ordering::Relaxed);
        } else if let Some(&i) = self.by_disk_ino.get(&ino) {
            self.disks[i].cached.store(true, Ordering::Relaxed);
        }
    }

    /// `len` bytes at disk offset `off` were written (or zeroed) through file `ino`: mark the table
    /// for a rescan if they touched it, and drop the other windows' cached copies of them.
    pub fn written(&self, ino: u64, off: u64, len: u64) {
        let i = match self.by_disk_ino.get(&ino) {
            Some(&i) => i,
            None => match self.view(ino) {
                Some(v) => v.disk,
                None => return,
            },
        };
        let d = &self.disks[i];
        let size = d.image.size();
        let st = d.state.read();
        let touches_table = overlap(off, len, 0, TABLE_EDGE).is_some()
            || overlap(off, len, size.saturating_sub(TABLE_EDGE), TABLE_EDGE).is_some()
            || st.table.as_ref().is_some_and(|t| {
                t.table_ranges
                    .iter()
                    .any(|&(s, l)| overlap(off, len, s, l).is_some())
            });
        if touches_table {
            d.dirty.store(true, Ordering::Release);
        }
        let mut jobs = Vec::new();
        if ino != d.disk_ino && d.cached.load(Ordering::Relaxed) {
            jobs.push((d.disk_ino, off, len));
        }
        for v in &st.views {
            if v.ino == ino || !v.cached.load(Ordering::Relaxed) {
                continue;
            }
            if let Some((s, l)) = overlap(off, len, v.part.start, v.part.len) {
                jobs.push((v.ino, s - v.part.start, l));
            }
        }
        drop(st);
        self.inval.run(jobs, true);
    }

    /// The writer of file `ino` fsynced or closed it: rescan its disk's table if it was touched.
    pub fn synced(&self, ino: u64) {
        let i = match self.by_disk_ino.get(&ino) {
            Some(&i) => Some(i),
            None => self.view(ino).map(|v| v.disk),
        };
        if let Some(i) = i {
            self.settle(i, true);
        }
    }

    fn settle(&self, i: usize, wait: bool) {
        if self.disks[i].dirty.load(Ordering::Acquire) {
            let removed = self.rescan(i);
            let jobs = removed.into_iter().map(|ino| (ino, 0, 0)).collect();
            self.inval.run(jobs, wait);
        }
    }

    /// Read disk `i`'s table again and rebuild its views; returns the inodes that went away.
    fn rescan(&self, i: usize) -> Vec<u64> {
        let d = &self.disks[i];
        let _one_at_a_time = d.scanning.lock();
        d.dirty.store(false, Ordering::Release);
        let name = d.image.path().display();
        let table = match table::scan(&ImageDisk(&d.image), sector_hint(&d.image)) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("{name}: cannot read the partition table: {e}");
                None
            }
        };
        let mut st = d.state.write();
        if st.table == table {
            return Vec::new();
        }
        match &table {
            Some(t) => {
                for w in &t.warnings {
                    log::warn!("{name}: partition table: {w}");
                }
                log::info!(
                    "{name}: {:?} partition table, {} partitions",
                    t.scheme,
                    t.partitions.len()
                );
            }
            None if st.table.is_some() => log::info!("{name}: partition table gone"),
            None => {}
        }
        let mut views = self.views.write();
        let mut kept = Vec::new();
        for p in table.iter().flat_map(|t| t.partitions.iter()) {
            let same = st.views.iter().find(|v| {
                v.part.number == p.number && v.part.start == p.start && v.part.len == p.len
            });
            let (ino, cached) = match same {
                Some(v) => (v.ino, v.cached.load(Ordering::Relaxed)),
                None => (self.next_ino.fetch_add(1, Ordering::Relaxed), false),
            };
            let v = Arc::new(View {
                ino,
                disk: i,
                part: p.clone(),
                cached: AtomicBool::new(cached),
            });
            views.insert(ino, v.clone());
            kept.push(v);
        }
        let removed: Vec<u64> = st
            .views
            .iter()
            .map(|v| v.ino)
            .filter(|ino| !kept.iter().any(|v| v.ino == *ino))
            .collect();
        for ino in &removed {
            views.remove(ino);
        }
        st.views = kept;
        st.table = table;
        removed
    }
}

/// Sends FUSE cache invalidations from its own thread: the kernel may have to wait for page locks
/// held by requests in flight, and a worker thread waiting there could be the one needed to
/// answer them.
#[derive(Default)]
struct Invalidator {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

struct Job {
    ino: u64,
    off: u64,
    len: u64,
    done: Option<Arc<(Mutex<usize>, Condvar)>>,
}

impl Invalidator {
    fn start(&self, notifier: fuser::Notifier) {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("imgfs-inval".into())
            .spawn(move || {
                for job in rx {
                    // len 0 = to the end of the file. ENOENT: the kernel holds no such inode.
                    let len = if job.len == 0 { 0 } else { job.len as i64 };
                    let ino = fuser::INodeNo(job.ino);
                    if let Err(e) = notifier.inval_inode(ino, job.off as i64, len) {
                        if e.raw_os_error() != Some(libc::ENOENT) {
                            log::debug!("invalidating inode {}: {e}", job.ino);
                        }
                    }
                    if let Some(done) = job.done {
                        *done.0.lock() -= 1;
                        done.1.notify_all();
                    }
                }
            });
        match spawned {
            Ok(_) => *self.tx.lock() = Some(tx),
            Err(e) => log::error!("cannot start the cache invalidation thread: {e}"),
        }
    }

    /// Invalidate (inode, offset, length) ranges; with `wait`, return once they are done (or
    /// after `INVAL_WAIT`).
    fn run(&self, jobs: Vec<(u64, u64, u64)>, wait: bool) {
        if jobs.is_empty() {
            return;
        }
        let Some(tx) = self.tx.lock().clone() else {
            return;
        };
        let done = wait.then(|| Arc::new((Mutex::new(jobs.len()), Condvar::new())));
        for (ino, off, len) in jobs {
            let job = Job {
                ino,
                off,
                len,
                done: done.clone(),
            };
            if tx.send(job).is_err() {
                return;
            }
        }
        if let Some(done) = done {
            let mut left = done.0.lock();
            let deadline = std::time::Instant::now() + INVAL_WAIT;
            while *left > 0 {
                if done.1.wait_until(&mut left, deadline).timed_out() {
                    log::debug!("cache invalidation still pending after {INVAL_WAIT:?}");
                    break;
                }
            }
        }
    }
}
