//! qcow (version 1): a header, an L1 table kept in memory, L2 tables and data clusters appended
//! at the end of the file, optionally zlib-compressed clusters. No refcounts and no dirty flag:
//! QEMU itself has no crash-consistency mechanism for this format.
//!
//! ```text
//!  | header | backing name | L1 (8-byte entries) | ... L2 / data / compressed data ...
//!  L1[guest >> (cluster_bits + l2_bits)] -> L2 table -> entry:
//!     0                      unallocated (backing file, or zeros)
//!     bit 63 set             compressed: size and offset packed below bit 63
//!     otherwise              byte offset of the data cluster
//! ```
//!
//! Write order: data and fills -> sync -> L2 tables -> sync -> L1 entries -> sync. What remains
//! after a crash: clusters written at the end of the file but not yet referenced (leaked space,
//! harmless: qcow has no refcounts and imgfs, like QEMU, never reuses space).

mod check;
mod create;
pub mod header;
mod resize;

use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::{write_fill, Prefetched};
use crate::format::{
    BackingRef, Below, BlockMap, CheckReport, CreateOpts, Extent, Format, FormatStats, ImageInfo,
    OpenCtx, Repair,
};
use crate::host::HostFile;
use header::{Entry, Header, HEADER_LEN};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct Qcow;

impl Format for Qcow {
    fn name(&self) -> &'static str {
        "qcow"
    }
    fn probe(&self, head: &[u8]) -> bool {
        header::probe(head)
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        Ok(Box::new(QcowMap::open(file, ctx)?))
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        let hdr = read_header(&file)?;
        check::check(&file, &hdr, repair)
    }
}

fn read_header(file: &HostFile) -> Result<Header> {
    let mut buf = [0u8; HEADER_LEN];
    let n = file.read_at(&mut buf, 0)?;
    Header::parse(&buf[..n], file.len()?)
}

/// Loads and stores L2 tables; a table is stored only after the clusters it may point at are
/// durable (`needs_sync` is set between filling a new cluster and publishing it).
struct L2Io {
    file: HostFile,
    needs_sync: AtomicBool,
}

impl TableIo for L2Io {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        if self.needs_sync.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.file.sync() {
                self.needs_sync.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.file.write_all_at(buf, off)
    }
}

fn entry_at(t: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(t[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}
fn set_entry(t: &mut [u8], i: usize, v: u64) {
    t[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

pub struct QcowMap {
    file: HostFile,
    hdr: Header,
    backing: Option<BackingRef>,
    read_only: bool,
    cs: u64,
    l1: RwLock<Vec<u64>>,
    /// Range of L1 indexes changed since the last flush.
    l1_dirty: Mutex<Option<(usize, usize)>>,
    l2: TableCache,
    io: L2Io,
    /// Next free cluster-aligned offset at the end of the file (allocation lock).
    alloc: Mutex<u64>,
    /// Bytes of the file that entries may point into.
    file_size: AtomicU64,
    /// The last decompressed cluster, by its L2 entry.
    zcache: Mutex<Option<(u64, Vec<u8>)>>,
    clusters_allocated: AtomicU64,
    /// Virtual size and L1 table offset: `hdr`'s until a resize (resize.rs) changes them.
    size: AtomicU64,
    l1_offset: AtomicU64,
}

impl QcowMap {
    fn open(file: HostFile, ctx: &OpenCtx) -> Result<QcowMap> {
        let file_len = file.len()?;
        let hdr = read_header(&file)?;
        let backing = hdr
            .read_backing_name(&file)?
            .map(|name| BackingRef { name, format: None });
        let mut l1b = vec![0u8; (hdr.l1_entries() * 8) as usize];
        file.read_exact_at(&mut l1b, hdr.l1_table_offset)?;
        let l1 = (0..l1b.len() / 8).map(|i| entry_at(&l1b, i)).collect();
        let cs = hdr.cluster_size();
        Ok(QcowMap {
            l2: TableCache::new(hdr.l2_bytes() as usize, ctx.cache_size),
            io: L2Io {
                file: file.clone(),
                needs_sync: AtomicBool::new(false),
            },
            alloc: Mutex::new(file_len.div_ceil(cs) * cs),
            file_size: AtomicU64::new(file_len),
            l1: RwLock::new(l1),
            l1_dirty: Mutex::new(None),
            zcache: Mutex::new(None),
            clusters_allocated: AtomicU64::new(0),
            size: AtomicU64::new(hdr.virtual_size()),
            l1_offset: AtomicU64::new(hdr.l1_table_offset),
            read_only: ctx.read_only,
            file,
            hdr,
            backing,
            cs,
        })
    }

    fn read_l1(&self) -> RwLockReadGuard<'_, Vec<u64>> {
        self.l1.read()
    }
    fn lock_alloc(&self) -> MutexGuard<'_, u64> {
        self.alloc.lock()
    }

    fn l1_index(&self, off: u64) -> usize {
        (off >> self.hdr.l2_span_bits()) as usize
    }
    fn l2_index(&self, off: u64) -> usize {
        ((off >> self.hdr.cluster_bits) & ((1 << self.hdr.l2_bits) - 1)) as usize
    }
    fn left_in_table(&self, off: u64) -> u64 {
        let span = 1u64 << self.hdr.l2_span_bits();
        span - (off & (span - 1))
    }
    fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cs - 1)
    }

    fn l2_for(&self, off: u64) -> Result<Option<u64>> {
        let idx = self.l1_index(off);
        let raw = *self
            .read_l1()
            .get(idx)
            .ok_or_else(|| Error::invalid(format!("guest offset {off:#x} beyond the L1 table")))?;
        if raw == 0 {
            return Ok(None);
        }
        // The allocator's end, read *after* the entry: an allocator grows it before publishing
        // an entry, so an end read earlier could be older than the entry (a false corruption).
        let fs = self.file_size.load(Ordering::SeqCst);
        if raw < HEADER_LEN as u64 || raw.checked_add(self.hdr.l2_bytes()).is_none_or(|e| e > fs) {
            return Err(Error::corrupt(format!(
                "qcow L1 entry {idx} points at an invalid L2 table offset {raw:#x}"
            ))
            .at(self.l1_offset.load(Ordering::Acquire) + idx as u64 * 8));
        }
        Ok(Some(raw))
    }

    fn classify(&self, raw: u64, fs: u64) -> Result<Entry> {
        let e = Entry::decode(raw, self.hdr.cluster_bits as u32);
        let ok = match e {
            Entry::Unalloc => true,
            Entry::Data(off) => off >= HEADER_LEN as u64 && off < fs,
            Entry::Compressed { off, size } => {
                size > 0 && off >= HEADER_LEN as u64 && off + size <= fs
            }
        };
        if !ok {
            return Err(Error::corrupt(format!(
                "qcow L2 entry {raw:#x} points outside the file or into the header"
            )));
        }
        Ok(e)
    }

    /// The run of same-kind clusters at `off`: unallocated, contiguous data, or one compressed
    /// cluster (to its end).
    fn run_at(&self, off: u64, len: u64) -> Result<(Entry, u64)> {
        let len = len.min(self.left_in_table(off));
        let Some(l2) = self.l2_for(off)? else {
            return Ok((Entry::Unalloc, len));
        };
        self.run_in(l2, off, len)
    }

    fn run_in(&self, l2: u64, off: u64, len: u64) -> Result<(Entry, u64)> {
        let len = len.min(self.left_in_table(off));
        let start = self.l2_index(off);
        let entries = 1usize << self.hdr.l2_bits;
        let cs = self.cs;
        let r = self.l2.with(&self.io, l2, |t| -> Result<(Entry, u64)> {
            // Read after the table (see `l2_for`).
            let fs = self.file_size.load(Ordering::SeqCst);
            let first = self.classify(entry_at(t, start), fs)?;
            let mut run = cs - self.in_cluster(off);
            if matches!(first, Entry::Compressed { .. }) {
                return Ok((first, run));
            }
            let mut i = start + 1;
            while run < len && i < entries {
                let e = self.classify(entry_at(t, i), fs)?;
                let same = match (first, e) {
                    (Entry::Data(a), Entry::Data(b)) => b == a + (i - start) as u64 * cs,
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                run += cs;
                i += 1;
            }
            Ok((first, run))
        })?;
        let (e, run) = r.map_err(|e| e.at(l2 + start as u64 * 8))?;
        Ok((e, run.min(len)))
    }

    /// Inflate a compressed cluster (raw deflate, exactly one cluster of output).
    fn decompress(&self, off: u64, size: u64) -> Result<Vec<u8>> {
        let key = Entry::Compressed { off, size }.encode(self.hdr.cluster_bits as u32);
        if let Some((k, data)) = self.zcache.lock().as_ref() {
            if *k == key {
                return Ok(data.clone());
            }
        }
        // Read and inflate with no lock held.
        let mut input = vec![0u8; size as usize];
        self.file.read_exact_at(&mut input, off)?;
        let mut out = vec![0u8; self.cs as usize];
        let mut z = flate2::Decompress::new(false);
        let bad =
            || Error::corrupt("qcow compressed cluster does not inflate to a cluster").at(off);
        z.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|_| bad())?;
        if z.total_out() != self.cs {
            return Err(bad());
        }
        *self.zcache.lock() = Some((key, out.clone()));
        Ok(out)
    }

    fn l2_table_for_write(&self, file_end: &mut u64, off: u64) -> Result<u64> {
        if let Some(l2) = self.l2_for(off)? {
            return Ok(l2);
        }
        let l2 = *file_end;
        let end = l2 + self.hdr.l2_bytes().div_ceil(self.cs) * self.cs;
        *file_end = end;
        self.file_size.fetch_max(end, Ordering::SeqCst);
        let zeroed = vec![0u8; self.hdr.l2_bytes() as usize].into_boxed_slice();
        self.l2.insert_new(&self.io, l2, zeroed)?;
        let idx = self.l1_index(off);
        self.l1.write()[idx] = l2;
        let mut d = self.l1_dirty.lock();
        *d = Some(d.map_or((idx, idx), |(a, b)| (a.min(idx), b.max(idx))));
        Ok(l2)
    }

    /// Allocate clusters at the end of the file for `[off, off+len)`, filling what the guest
    /// write does not cover (from below, or from the old compressed cluster).
    fn allocate(
        &self,
        off: u64,
        len: u64,
        below: &dyn Below,
        pre: Option<&Prefetched>,
    ) -> Result<Extent> {
        let mut file_end = self.lock_alloc();
        let l2 = self.l2_table_for_write(&mut file_end, off)?;
        let (first, run) = self.run_in(l2, off, len)?;
        let cs = self.cs;
        let cstart = off - self.in_cluster(off);
        let host = *file_end;
        let n = match first {
            Entry::Data(h) => {
                return Ok(Extent::Data {
                    host: h + self.in_cluster(off),
                    len: run,
                })
            }
            Entry::Compressed { off: coff, size } => {
                let data = self.decompress(coff, size)?;
                self.file.write_all_at(&data, host)?;
                1
            }
            Entry::Unalloc => {
                let n = (self.in_cluster(off) + run).div_ceil(cs);
                let run_end = cstart + n * cs;
                let data_end = (off + len).min(run_end);
                self.fill(host, cstart, off - cstart, below, pre)?;
                self.fill(
                    host + (data_end - cstart),
                    data_end,
                    run_end - data_end,
                    below,
                    pre,
                )?;
                n
            }
        };
        let host_end = host + n * cs;
        if self.file.len()? < host_end {
            self.file.set_len(host_end)?;
        }
        *file_end = host_end;
        self.file_size.fetch_max(host_end, Ordering::SeqCst);
        self.io.needs_sync.store(true, Ordering::SeqCst);
        let first_idx = self.l2_index(off);
        self.l2.with_mut(&self.io, l2, |t| {
            for i in 0..n {
                set_entry(t, first_idx + i as usize, host + i * cs);
            }
        })?;
        self.clusters_allocated.fetch_add(n, Ordering::Relaxed);
        Ok(Extent::Data {
            host: host + (off - cstart),
            len: (off + len).min(cstart + n * cs) - off,
        })
    }

    fn fill(
        &self,
        host: u64,
        guest: u64,
        len: u64,
        below: &dyn Below,
        pre: Option<&Prefetched>,
    ) -> Result<()> {
        let fill = Prefetched::fill(pre, below, guest, len, self.size.load(Ordering::Acquire));
        write_fill(
            &self.file,
            host,
            len as usize,
            fill,
            host >= self.file.len()?,
        )
    }

    fn flush_locked(&self) -> Result<()> {
        self.file.sync()?;
        self.io.needs_sync.store(false, Ordering::SeqCst);
        if self.l2.is_dirty() {
            self.l2.flush(&self.io)?;
            self.file.sync()?;
        }
        let dirty = self.l1_dirty.lock().take();
        if let Some((a, b)) = dirty {
            let bytes: Vec<u8> = self.read_l1()[a..=b]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            let at = self.l1_offset.load(Ordering::Acquire) + a as u64 * 8;
            if let Err(e) = self
                .file
                .write_all_at(&bytes, at)
                .and_then(|_| self.file.sync())
            {
                *self.l1_dirty.lock() = Some((a, b));
                return Err(e);
            }
        }
        Ok(())
    }
}

impl BlockMap for QcowMap {
    fn info(&self) -> ImageInfo {
        let h = &self.hdr;
        let mut d = serde_json::Map::new();
        d.insert("version".into(), 1.into());
        d.insert("cluster_bits".into(), h.cluster_bits.into());
        d.insert("l2_bits".into(), h.l2_bits.into());
        d.insert("crypt_method".into(), h.crypt_method.into());
        ImageInfo {
            format: "qcow",
            virtual_size: self.size.load(Ordering::Acquire),
            cluster_size: self.cs,
            backing: self.backing.clone(),
            details: d,
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (e, run) = self.run_at(off, len)?;
        Ok(match e {
            Entry::Unalloc => Extent::Backing { len: run },
            Entry::Data(h) => Extent::Data {
                host: h + self.in_cluster(off),
                len: run,
            },
            Entry::Compressed { .. } => Extent::Format { len: run },
        })
    }

    fn read_format(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let (e, run) = self.run_at(off, buf.len() as u64)?;
        let Entry::Compressed { off: coff, size } = e else {
            return Err(Error::corrupt("qcow cluster is no longer compressed").at(off));
        };
        if (run as usize) < buf.len() {
            return Err(Error::invalid("compressed read crosses a cluster").at(off));
        }
        let data = self.decompress(coff, size)?;
        let s = self.in_cluster(off) as usize;
        buf.copy_from_slice(&data[s..s + buf.len()]);
        Ok(())
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        if self.read_only {
            return Err(Error::read_only("qcow image is open read-only"));
        }
        let pre = match self.run_at(off, len)? {
            (Entry::Data(h), run) => {
                return Ok(Extent::Data {
                    host: h + self.in_cluster(off),
                    len: run,
                })
            }
            // Copy-on-write source read before the allocation lock.
            (Entry::Unalloc, _) => {
                let cstart = off - self.in_cluster(off);
                let size = self.size.load(Ordering::Acquire);
                Prefetched::read(below, cstart, self.cs, (off, len), size)?
            }
            _ => None,
        };
        self.allocate(off, len, below, pre.as_ref())
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        if self.read_only {
            return Err(Error::read_only("qcow image is open read-only"));
        }
        if self.backing.is_some() {
            return Ok(false); // an unallocated cluster would show the backing file
        }
        let _a = self.lock_alloc();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (e, run) = self.run_at(pos, end - pos)?;
            if let (false, Some(l2)) = (e == Entry::Unalloc, self.l2_for(pos)?) {
                let first = self.l2_index(pos);
                let n = run.div_ceil(self.cs) as usize;
                self.l2.with_mut(&self.io, l2, |t| {
                    (first..first + n).for_each(|i| set_entry(t, i, 0))
                })?;
                if let (Entry::Data(h), true) = (e, unmap) {
                    self.file.punch_hole(h, run)?;
                }
            }
            pos += run;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = self.lock_alloc();
        self.flush_locked()
    }

    fn stats(&self) -> FormatStats {
        FormatStats {
            cache: self.l2.stats(),
            clusters_allocated: self.clusters_allocated.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_to(new_size)
    }
}
