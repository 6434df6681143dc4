//! QED (QEMU Enhanced Disk): a header, one L1 table and L2 tables of `table_size` clusters, data
//! clusters appended at the end of the file. No refcounts: consistency after a crash comes from
//! the need-check feature bit, set durably before the first allocating write and cleared on a
//! clean close.
//!
//! ```text
//!  +--------+----------+---------------------+--------+------+-----
//!  | header | L1 table | data / L2 / data ... | L2     | data | ...   (appended in order)
//!  +--------+----------+---------------------+--------+------+-----
//! ```
//!
//! Write-back order (flush): data clusters and fills -> sync -> dirty L2 tables -> sync -> L1 ->
//! sync. An evicted L2 table syncs the data first (`L2Io::store`).

mod check;
mod create;
pub mod header;
mod resize;
mod table;
mod write;

use crate::cache::TableCache;
use crate::error::{Error, Result};
use crate::format::Prefetched;
use crate::format::{
    BackingRef, Below, BlockMap, CheckReport, CreateOpts, Extent, Format, FormatStats, ImageInfo,
    OpenCtx, Repair,
};
use crate::host::HostFile;
use header::{Header, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_LEN, KNOWN_AUTOCLEAR};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use table::{Entry, Geometry, L2Io, Run};

pub struct Qed;

impl Format for Qed {
    fn name(&self) -> &'static str {
        "qed"
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(header::MAGIC)
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        Ok(Box::new(QedMap::open(file, ctx)?))
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        let h = read_header(&file)?;
        check::check(&file, &h, repair)
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
}

fn read_header(file: &HostFile) -> Result<Header> {
    let mut buf = [0u8; HEADER_LEN];
    let n = file.read_at(&mut buf, 0)?;
    Header::parse(&buf[..n], file.len()?)
}

/// Allocation state: the next free cluster at the end of the file and the host length.
struct Alloc {
    /// First byte past the last allocated cluster (cluster-aligned).
    file_end: u64,
    /// Length of the host file as last extended by us.
    file_len: u64,
    /// Whether NEED_CHECK is set on disk.
    need_check_on_disk: bool,
}

pub struct QedMap {
    file: HostFile,
    hdr: Header,
    geo: Geometry,
    backing: Option<BackingRef>,
    read_only: bool,
    /// Needs a check but opened read-only: invalid entries read as unallocated.
    lenient: bool,
    l1: RwLock<Vec<u64>>,
    l1_dirty: AtomicBool,
    l2: TableCache,
    io: L2Io,
    alloc: Mutex<Alloc>,
    /// Copy of `Alloc::file_end` for lock-free validation of entries.
    file_size: AtomicU64,
    clusters_allocated: AtomicU64,
    /// Virtual size (`hdr.image_size` until a resize: resize.rs).
    size: AtomicU64,
}

impl QedMap {
    fn open(file: HostFile, ctx: &OpenCtx) -> Result<QedMap> {
        let mut hdr = read_header(&file)?;
        let name = hdr.read_backing_name(&file)?;
        let backing = name.map(|name| BackingRef {
            name,
            format: (hdr.features & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string()),
        });
        if !ctx.read_only && hdr.autoclear_features & !KNOWN_AUTOCLEAR != 0 {
            hdr.autoclear_features &= KNOWN_AUTOCLEAR;
            write_header_sync(&file, &hdr)?;
        }
        let mut lenient = false;
        if hdr.need_check() {
            if ctx.read_only {
                lenient = true;
            } else {
                // Repairs the tables and clears NEED_CHECK when nothing is left corrupt.
                let r = check::check(&file, &hdr, Repair::All)?;
                if r.corruptions > r.corruptions_fixed {
                    return Err(Error::corrupt(format!(
                        "QED image needed a check and {} corruptions remain after repair ({}); \
                         open it read-only",
                        r.corruptions - r.corruptions_fixed,
                        r.messages
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
                hdr = read_header(&file)?;
            }
        }
        let geo = Geometry::new(&hdr);
        let l1 = table::read_table(&file, hdr.l1_table_offset, geo.table_bytes)?;
        let file_len = file.len()?;
        let file_end = file_len & !(geo.cluster_size - 1);
        Ok(QedMap {
            l2: table::new_cache(&geo, ctx.cache_size),
            io: L2Io {
                file: file.clone(),
                needs_sync: AtomicBool::new(false),
            },
            alloc: Mutex::new(Alloc {
                file_end,
                file_len,
                need_check_on_disk: hdr.need_check(),
            }),
            file_size: AtomicU64::new(file_end),
            l1: RwLock::new(l1),
            l1_dirty: AtomicBool::new(false),
            clusters_allocated: AtomicU64::new(0),
            size: AtomicU64::new(hdr.image_size),
            read_only: ctx.read_only,
            file,
            hdr,
            geo,
            backing,
            lenient,
        })
    }

    fn lock_alloc(&self) -> MutexGuard<'_, Alloc> {
        self.alloc.lock()
    }
    fn read_l1(&self) -> RwLockReadGuard<'_, Vec<u64>> {
        self.l1.read()
    }

    /// The L2 table offset mapping `off`, None when unallocated.
    fn l2_for(&self, off: u64) -> Result<Option<u64>> {
        let l1 = self.read_l1();
        // The allocator's end, read *after* the entry: an allocator grows it before publishing
        // an entry, so an end read earlier could be older than the entry (a false corruption).
        let fs = self.file_size.load(Ordering::SeqCst);
        table::l2_offset(&self.hdr, &l1, self.geo.l1_index(off), fs, self.lenient)
    }

    /// The run of same-kind clusters at `off` (at most `len` bytes).
    fn run_at(&self, off: u64, len: u64) -> Result<Run> {
        let Some(l2) = self.l2_for(off)? else {
            return Ok(Run {
                first: Entry::Unalloc,
                len: len.min(self.geo.left_in_table(off)),
            });
        };
        self.run_in(l2, off, len)
    }

    fn run_in(&self, l2: u64, off: u64, len: u64) -> Result<Run> {
        let (h, g, lenient) = (&self.hdr, &self.geo, self.lenient);
        self.l2
            .with(&self.io, l2, |t| {
                // Read after the table (see `l2_for`).
                let fs = self.file_size.load(Ordering::SeqCst);
                table::scan_run(g, t, off, len, |raw| table::classify(h, raw, fs, lenient))
            })?
            .map_err(|e| e.at(l2 + g.l2_index(off) as u64 * 8))
    }

    fn write_l1(&self) -> Result<()> {
        let bytes = table::vec_to_table(&self.read_l1());
        self.file.write_all_at(&bytes, self.hdr.l1_table_offset)
    }

    fn set_need_check(&self, a: &mut Alloc, on: bool) -> Result<()> {
        if a.need_check_on_disk == on {
            return Ok(());
        }
        let mut h = self.hdr.clone();
        h.image_size = self.size.load(Ordering::Acquire);
        if on {
            h.features |= F_NEED_CHECK;
        } else {
            h.features &= !F_NEED_CHECK;
        }
        write_header_sync(&self.file, &h)?;
        a.need_check_on_disk = on;
        Ok(())
    }

    fn flush_locked(&self) -> Result<()> {
        self.file.sync()?;
        self.io.needs_sync.store(false, Ordering::SeqCst);
        if self.l2.is_dirty() {
            self.l2.flush(&self.io)?;
            self.file.sync()?;
        }
        if self.l1_dirty.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.write_l1().and_then(|_| self.file.sync()) {
                self.l1_dirty.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        Ok(())
    }
}

fn write_header_sync(file: &HostFile, h: &Header) -> Result<()> {
    file.write_all_at(&h.to_bytes(), 0)?;
    file.sync()
}

impl BlockMap for QedMap {
    fn info(&self) -> ImageInfo {
        let h = &self.hdr;
        let mut d = serde_json::Map::new();
        d.insert("cluster_size".into(), h.cluster_size.into());
        d.insert("table_size".into(), h.table_size.into());
        d.insert("header_size".into(), h.header_size.into());
        d.insert("features".into(), h.features.into());
        d.insert("compat_features".into(), h.compat_features.into());
        d.insert("autoclear_features".into(), h.autoclear_features.into());
        let nc = self.lock_alloc().need_check_on_disk;
        d.insert("need_check".into(), nc.into());
        ImageInfo {
            format: "qed",
            virtual_size: self.size.load(Ordering::Acquire),
            cluster_size: h.cluster_size as u64,
            backing: self.backing.clone(),
            details: d,
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let run = self.run_at(off, len)?;
        Ok(match run.first {
            Entry::Unalloc => Extent::Backing { len: run.len },
            Entry::Zero => Extent::Zero { len: run.len },
            Entry::Data(host) => Extent::Data {
                host: host + self.geo.in_cluster(off),
                len: run.len,
            },
        })
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        if self.read_only {
            return Err(Error::read_only("QED image is open read-only"));
        }
        let run = self.run_at(off, len)?;
        if let Entry::Data(host) = run.first {
            return Ok(Extent::Data {
                host: host + self.geo.in_cluster(off),
                len: run.len,
            });
        }
        // Copy-on-write source read before the allocation lock.
        let cs = self.geo.cluster_size;
        let cstart = off - self.geo.in_cluster(off);
        let pre = match run.first {
            Entry::Unalloc => {
                let size = self.size.load(Ordering::Acquire);
                Prefetched::read(below, cstart, cs, (off, len), size)?
            }
            _ => None,
        };
        self.allocate(off, len, below, pre.as_ref())
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        if self.read_only {
            return Err(Error::read_only("QED image is open read-only"));
        }
        self.zero_clusters(off, len, unmap)?;
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = self.lock_alloc();
        self.flush_locked()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_to(new_size)
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut a = self.lock_alloc();
        self.flush_locked()?;
        self.set_need_check(&mut a, false)
    }

    fn stats(&self) -> FormatStats {
        FormatStats {
            cache: self.l2.stats(),
            clusters_allocated: self.clusters_allocated.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}
