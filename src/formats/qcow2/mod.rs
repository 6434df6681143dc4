//! qcow2 (v2 = compat 0.10, v3 = compat 1.1). Spec: QEMU docs/interop/qcow2.rst.
//!
//! ```text
//!   cluster 0: header + extensions (+ backing file name)
//!   refcount table -> refcount blocks          (refcount.rs)
//!   L1 table (in memory) -> L2 tables (cache)  (map.rs) -> data / compressed clusters
//!   snapshot table -> per-snapshot L1 tables   (snapshot.rs)
//! ```
//! Writes live in write.rs, the refcount walker (check / rebuild) in check.rs, images are made
//! by create.rs.
//!
//! Crash safety in one line: a cluster's refcount is durable before any table points at it,
//! data is durable before the L2 entry that points at it, L1 and the refcount table (and the
//! header fields naming it) are written last, and refcount decrements wait until the tables that
//! dropped the reference are durable. A cut leaves at most leaked clusters.
//!
//! Not supported: encryption (refused), creating/deleting/reverting internal snapshots (they are
//! read-only views), maintaining persistent bitmaps (dropped, with their clusters, on the first
//! write, after clearing the autoclear bit as the spec requires of writers that do not
//! maintain them).

mod check;
mod compressed;
mod create;
mod entry;
pub mod header;
mod map;
mod refcount;
mod resize;
mod snapshot;
mod write;

use crate::error::{Error, Result};
use crate::format::{
    BackingRef, Below, BlockMap, CheckReport, CreateOpts, Extent, Format, FormatStats, ImageInfo,
    OpenCtx, Repair, SnapshotInfo,
};
use crate::host::HostFile;
use header::Header;
use map::{Alloc, Geo, Mapper, Piece, L1};
use refcount::Refcounts;
use serde_json::json;
use snapshot::Snapshot;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Qcow2;

impl Format for Qcow2 {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= 8
            && &head[..4] == header::MAGIC
            && matches!(
                u32::from_be_bytes([head[4], head[5], head[6], head[7]]),
                2 | 3
            )
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        Ok(Box::new(Qcow2Map::open(file, ctx)?))
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        check::check_file(file, repair)
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
}

/// Read and validate the header of `file`.
pub fn read_header(file: &HostFile) -> Result<Header> {
    let len = file.len()?;
    let mut head = vec![0u8; len.min(header::V3_HEADER_LEN as u64) as usize];
    file.read_exact_at(&mut head, 0)?;
    let cb = Header::peek_cluster_bits(&head)?;
    let mut buf = vec![0u8; len.min(1 << cb) as usize];
    file.read_exact_at(&mut buf, 0)?;
    Header::parse(&buf, len)
}

pub struct Qcow2Map {
    pub(crate) m: Mapper,
    pub(crate) hdr: Header,
    /// Virtual size (grows online: resize.rs).
    pub(crate) size: AtomicU64,
    pub(crate) read_only: bool,
    pub(crate) snapshots: Vec<Snapshot>,
    /// A snapshot view: never written.
    pub(crate) snapshot_view: Option<String>,
    data_file: Option<HostFile>,
    cache_size: u64,
}

impl Qcow2Map {
    fn open(file: HostFile, ctx: &OpenCtx) -> Result<Qcow2Map> {
        let hdr = read_header(&file)?;
        if hdr.is_corrupt() {
            if !ctx.read_only {
                return Err(Error::read_only(
                    "image is marked corrupt (incompatible bit 1); it can only be opened \
                     read-only (repair it with qemu-img check -r all)",
                ));
            }
            log::warn!(
                "{}: qcow2 image is marked corrupt; opened read-only",
                file.path().display()
            );
        }
        let data_file = match (&hdr.data_file, hdr.has_data_file()) {
            (Some(name), true) => Some((ctx.open_sibling)(name)?),
            _ => None,
        };
        let geo = Geo::new(&hdr);
        let l1 = map::read_l1(&file, hdr.l1_table_offset, hdr.l1_size, hdr.cluster_size())?;
        let rc = Refcounts::load(
            &file,
            hdr.cluster_bits,
            hdr.refcount_order,
            hdr.refcount_table_offset,
            u64::from(hdr.refcount_table_clusters),
            (ctx.cache_size / 4).max(2 * hdr.cluster_size()),
        )?;
        let (snapshots, _) = snapshot::read_table(&file, &hdr)?;
        let l1 = L1 {
            entries: l1,
            offset: hdr.l1_table_offset,
            dirty: None,
        };
        let l2 = crate::cache::TableCache::new(hdr.cluster_size() as usize, ctx.cache_size / 4 * 3);
        let alloc = Alloc {
            rc: Some(rc),
            incompat: hdr.incompatible,
            autoclear: hdr.autoclear,
            prepared: false,
            bitmaps: hdr.bitmaps.is_some(),
        };
        let data = data_file.clone().unwrap_or_else(|| file.clone());
        let map = Qcow2Map {
            m: Mapper::new(file, data, geo, l1, l2, alloc),
            size: AtomicU64::new(hdr.size),
            read_only: ctx.read_only,
            snapshots,
            snapshot_view: None,
            data_file,
            cache_size: ctx.cache_size,
            hdr,
        };
        if map.hdr.is_dirty() && !ctx.read_only {
            // Lazy refcounts left the image dirty: rebuild refcounts before anything is written.
            let mut a = map.m.lock_alloc();
            check::rebuild(&map, &mut a)?;
            write::set_incompat(&map, &mut a, false)?;
        }
        Ok(map)
    }

    fn details(&self) -> serde_json::Map<String, serde_json::Value> {
        let h = &self.hdr;
        let (incompat, bitmaps) = {
            let a = self.m.lock_alloc();
            (a.incompat, a.bitmaps)
        };
        let mut d = serde_json::Map::new();
        d.insert("version".into(), json!(h.version));
        d.insert(
            "compat".into(),
            json!(if h.version == 2 { "0.10" } else { "1.1" }),
        );
        d.insert("cluster_size".into(), json!(h.cluster_size()));
        d.insert("refcount_bits".into(), json!(h.refcount_bits()));
        d.insert("lazy_refcounts".into(), json!(h.lazy_refcounts()));
        d.insert(
            "dirty".into(),
            json!(incompat & header::INCOMPAT_DIRTY != 0),
        );
        d.insert("corrupt".into(), json!(h.is_corrupt()));
        d.insert("extended_l2".into(), json!(h.extended_l2()));
        d.insert(
            "compression_type".into(),
            json!(match h.compression {
                header::Compression::Deflate => "zlib",
                header::Compression::Zstd => "zstd",
            }),
        );
        d.insert("snapshots".into(), json!(self.snapshots.len()));
        d.insert("l1_size".into(), json!(self.m.l1.read().entries.len()));
        if let Some(f) = &h.data_file {
            d.insert("data_file".into(), json!(f));
            d.insert(
                "data_file_raw".into(),
                json!(h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
        if let (Some(b), true) = (&h.bitmaps, bitmaps) {
            d.insert("bitmaps".into(), json!(b.nb_bitmaps));
        }
        if let Some(v) = &self.snapshot_view {
            d.insert("snapshot".into(), json!(v));
        }
        d
    }
}

impl BlockMap for Qcow2Map {
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "qcow2",
            virtual_size: self.size.load(Ordering::Acquire),
            cluster_size: self.hdr.cluster_size(),
            backing: self.hdr.backing_file.as_ref().map(|name| BackingRef {
                name: name.clone(),
                format: self.hdr.backing_format.clone(),
            }),
            details: self.details(),
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (p, n) = self.m.run(off, len)?;
        Ok(match p {
            Piece::Data(host) => Extent::Data { host, len: n },
            Piece::Zero => Extent::Zero { len: n },
            Piece::Backing => Extent::Backing { len: n },
            Piece::Compressed(_) => Extent::Format { len: n },
        })
    }

    fn read_format(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.m.read_compressed(off, buf)
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        write::map_write(self, off, len, below)
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, below: &dyn Below) -> Result<bool> {
        let _ = below;
        write::write_zeroes(self, off, len, unmap)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        write::flush(self, &mut self.m.lock_alloc())
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut a = self.m.lock_alloc();
        write::flush(self, &mut a)?;
        if a.incompat & header::INCOMPAT_DIRTY != 0 {
            write::set_incompat(self, &mut a, false)?;
        }
        // A later write marks the image dirty again (lazy refcounts).
        a.prepared = false;
        self.m.prepared.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn data_file(&self) -> Option<HostFile> {
        self.data_file.clone()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        resize::resize(self, new_size)
    }

    fn data_end(&self) -> Option<u64> {
        if self.data_file.is_some() {
            return None;
        }
        if self.read_only {
            return self.m.file.len().ok();
        }
        // Writable: clusters up to the allocation frontier may still be past EOF.
        Some(self.m.frontier.load(Ordering::SeqCst))
    }

    fn stats(&self) -> FormatStats {
        let allocated = self.m.lock_alloc().rc.as_ref().map_or(0, |r| r.allocated);
        FormatStats {
            cache: self.m.l2.stats(),
            clusters_allocated: allocated,
            ..FormatStats::default()
        }
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(Snapshot::info).collect()
    }

    fn open_snapshot(&self, id: &str) -> Result<Box<dyn BlockMap>> {
        let s = snapshot::find(&self.snapshots, id).ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::NotFound,
                format!("no snapshot {id:?}"),
            )
        })?;
        let file = self.m.file.clone();
        let l1 = map::read_l1(&file, s.l1_table_offset, s.l1_size, self.hdr.cluster_size())?;
        let l1 = L1 {
            entries: l1,
            offset: s.l1_table_offset,
            dirty: None,
        };
        let l2 = crate::cache::TableCache::new(
            self.hdr.cluster_size() as usize,
            (self.cache_size / 4).max(2 * self.hdr.cluster_size()),
        );
        let alloc = Alloc {
            rc: None,
            incompat: self.hdr.incompatible,
            autoclear: self.hdr.autoclear,
            prepared: true,
            bitmaps: false,
        };
        Ok(Box::new(Qcow2Map {
            m: Mapper::new(file, self.m.data.clone(), self.m.geo.clone(), l1, l2, alloc),
            hdr: self.hdr.clone(),
            size: AtomicU64::new(s.disk_size),
            read_only: true,
            snapshots: Vec::new(),
            snapshot_view: Some(format!("{} ({})", s.name, s.id)),
            data_file: self.data_file.clone(),
            cache_size: self.cache_size,
        }))
    }
}
