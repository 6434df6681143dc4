//! Sparse (`KDMV`) extents: header, grain directory (GD) and redundant directory (RGD), grain
//! tables (GT) through the `TableCache`, allocating writes and zeroed-grain entries.
//!
//! ```text
//!  | header | descriptor | RGD | RGTs | GD | GTs | (overhead end) grain grain ... (appended)
//!  guest offset in extent:  | GD index | GT index | byte in grain |
//!  GD[i] -> GT (sector)   GT[j] = 0 unallocated | 1 zeroed grain (flag bit 2) | grain sector
//! ```
//!
//! Write order (flush): grains and their fills (and, for COWD, the header's free sector past
//! them) -> sync -> GTs (and their RGT copies) -> sync -> GD and RGD entries of new tables -> sync. A GT is never written before the grains it points
//! at are durable (`GtIo::store` syncs first), and a GD entry never before its new GT.

use super::stream;
use crate::cache::{CacheStats, TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::{write_fill, Below, Extent, Fill, Prefetched};
use crate::formats::le32;
use crate::host::HostFile;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub const MAGIC: &[u8; 4] = b"KDMV";
pub const SECTOR: u64 = 512;
pub const FLAG_NL_TEST: u32 = 1;
pub const FLAG_RGD: u32 = 1 << 1;
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub const FLAG_COMPRESSED: u32 = 1 << 16;
pub const FLAG_MARKERS: u32 = 1 << 17;
pub const GD_AT_END: u64 = u64::MAX;
/// GT entry of a zeroed grain (with `FLAG_ZERO_GRAIN`).
pub const GTE_ZEROED: u32 = 1;
/// Largest grain accepted: 16 MiB (VMware uses 64 KiB).
pub const MAX_GRAIN_SECTORS: u64 = 1 << 15;
/// Largest grain directory accepted, in entries (4M: 128 TiB of 64 KiB grains).
pub const MAX_GD_ENTRIES: u64 = 1 << 22;

/// The 512-byte sparse extent header (little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes_per_gt: u32,
    pub rgd_offset: u64,
    pub gd_offset: u64,
    pub overhead: u64,
    pub unclean: u8,
    pub compress: u16,
}

fn le64(b: &[u8], at: usize) -> u64 {
    crate::formats::le64(b, at)
}

impl Header {
    /// Parse and validate (magic, version, grain and table sizes).
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < 512 || &b[..4] != MAGIC {
            return Err(Error::corrupt("not a VMDK sparse extent (no KDMV magic)"));
        }
        let h = Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            unclean: b[72],
            compress: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::unsupported(format!(
                "VMDK sparse extent version {} is not supported",
                h.version
            )));
        }
        if h.grain == 0 || !h.grain.is_power_of_two() || h.grain > MAX_GRAIN_SECTORS {
            return Err(Error::corrupt(format!(
                "VMDK grain size {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                h.grain
            )));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > 512 {
            return Err(Error::corrupt(format!(
                "VMDK grain tables of {} entries (1 to 512 allowed)",
                h.gtes_per_gt
            )));
        }
        if h.capacity > super::MAX_SECTORS {
            return Err(Error::corrupt("VMDK extent capacity over 64 TiB"));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress != 1 {
            return Err(Error::unsupported(format!(
                "VMDK compression algorithm {} (only deflate is known)",
                h.compress
            )));
        }
        if h.gd_entries() > MAX_GD_ENTRIES {
            return Err(Error::corrupt("VMDK grain directory too large"));
        }
        if h.desc_size > super::descriptor::MAX_DESCRIPTOR / SECTOR {
            return Err(Error::corrupt("VMDK embedded descriptor larger than 1 MiB"));
        }
        // Sector offsets must stay byte offsets (found by the open_vmdk fuzz target).
        let far = |s: u64| s > u64::MAX / SECTOR - super::descriptor::MAX_DESCRIPTOR;
        if far(h.desc_offset) || far(h.rgd_offset) || (h.gd_offset != GD_AT_END && far(h.gd_offset))
        {
            return Err(Error::corrupt("VMDK header offset outside any file"));
        }
        Ok(h)
    }

    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        for (at, v) in [
            (12, self.capacity),
            (20, self.grain),
            (28, self.desc_offset),
            (36, self.desc_size),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[44..48].copy_from_slice(&self.gtes_per_gt.to_le_bytes());
        for (at, v) in [
            (48, self.rgd_offset),
            (56, self.gd_offset),
            (64, self.overhead),
        ] {
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        b[72] = self.unclean;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }

    pub fn grain_bytes(&self) -> u64 {
        self.grain * SECTOR
    }
    /// Guest bytes one grain table maps.
    pub fn gt_span(&self) -> u64 {
        self.grain_bytes() * self.gtes_per_gt as u64
    }
    pub fn gt_bytes(&self) -> u64 {
        self.gtes_per_gt as u64 * 4
    }
    pub fn gd_entries(&self) -> u64 {
        (self.capacity * SECTOR).div_ceil(self.gt_span())
    }
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }
    pub fn has_rgd(&self) -> bool {
        self.flags & FLAG_RGD != 0 && self.rgd_offset != 0
    }
}

/// Read a directory of `n` u32 entries at sector `sector`.
pub fn read_dir(file: &HostFile, sector: u64, n: u64, file_len: u64) -> Result<Vec<u32>> {
    let off = sector
        .checked_mul(SECTOR)
        .filter(|o| o.checked_add(n * 4).is_some_and(|e| e <= file_len))
        .ok_or_else(|| {
            Error::corrupt(format!(
                "VMDK grain directory at sector {sector} lies outside the file"
            ))
        })?;
    let mut b = vec![0u8; (n * 4) as usize];
    file.read_exact_at(&mut b, off)?;
    Ok(b.chunks_exact(4).map(|c| le32(c, 0)).collect())
}

fn dir_bytes(d: &[u32]) -> Vec<u8> {
    d.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// A header field naming the next free sector (COWD's `freeSector`), kept past every grain.
pub struct FreeSector {
    /// Byte offset of the u32 field in the extent file.
    pub at: u64,
    /// The value on disk.
    pub recorded: AtomicU64,
}

/// Loads and stores grain tables keyed by their GD index; a store writes the GT and its
/// redundant copy, after syncing the grains it may point at.
struct GtIo {
    file: HostFile,
    gd: Arc<RwLock<Vec<u32>>>,
    rgd: Arc<RwLock<Vec<u32>>>,
    needs_sync: AtomicBool,
    /// The allocator's end (shared with `Sparse::end`).
    end: Arc<AtomicU64>,
    free: Option<FreeSector>,
}

impl GtIo {
    /// Make the grains written so far durable, so that tables may point at them. A free-sector
    /// field is raised past them first: the same sync makes it durable before any table.
    fn sync_grains(&self) -> Result<()> {
        if let Some(f) = &self.free {
            let sector = self.end.load(Ordering::SeqCst) / SECTOR;
            if sector > f.recorded.load(Ordering::SeqCst) {
                // Bounded by the allocator: an extent never grows past 2 TiB.
                self.file
                    .write_all_at(&(sector as u32).to_le_bytes(), f.at)?;
                f.recorded.store(sector, Ordering::SeqCst);
            }
        }
        self.file.sync()
    }
}

impl TableIo for GtIo {
    fn load(&self, idx: u64, buf: &mut [u8]) -> Result<()> {
        let sector = self.gd.read()[idx as usize] as u64;
        self.file.read_exact_at(buf, sector * SECTOR)
    }
    fn store(&self, idx: u64, buf: &[u8]) -> Result<()> {
        if self.needs_sync.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.sync_grains() {
                self.needs_sync.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        let sector = self.gd.read()[idx as usize] as u64;
        self.file.write_all_at(buf, sector * SECTOR)?;
        let r = self.rgd.read().get(idx as usize).copied().unwrap_or(0) as u64;
        if r != 0 {
            self.file.write_all_at(buf, r * SECTOR)?;
        }
        Ok(())
    }
}

/// What one GT entry says (KDMV, COWD and seSparse alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    Unalloc,
    Zero,
    /// Grain at this byte offset in the file.
    Grain(u64),
}

impl Entry {
    /// Whether entry `e`, `n` grains of `grain` bytes after this one, continues this one's run:
    /// the same kind, and for grains the next ones on disk.
    pub(super) fn continued_by(self, e: Entry, n: usize, grain: u64) -> bool {
        match (self, e) {
            (Entry::Grain(a), Entry::Grain(b)) => b == a + n as u64 * grain,
            (a, b) => a == b,
        }
    }
}

struct Alloc {
    /// Next free byte (sector-aligned) at the end of the extent file.
    end: u64,
    /// File length as last extended by us.
    file_len: u64,
}

pub struct Sparse {
    /// The engine's file number for `Extent::InFile`.
    pub file_no: u32,
    pub file: HostFile,
    pub hdr: Header,
    /// Bytes of the disk this extent holds (the descriptor's extent size).
    len: u64,
    gd: Arc<RwLock<Vec<u32>>>,
    rgd: Arc<RwLock<Vec<u32>>>,
    gd_dirty: AtomicBool,
    cache: TableCache,
    io: GtIo,
    alloc: Mutex<Alloc>,
    /// Copy of `Alloc::end` for lock-free validation of entries.
    end: Arc<AtomicU64>,
    pub grains_allocated: AtomicU64,
}

impl Sparse {
    /// Open a sparse extent whose header is `hdr` (the footer's, for a stream-optimized
    /// extent whose directory is at the end; a translated one for COWD, with its free-sector
    /// field in `free`).
    pub fn open(
        file_no: u32,
        file: HostFile,
        (hdr, free): (Header, Option<FreeSector>),
        len: u64,
        cache_size: u64,
    ) -> Result<Sparse> {
        let file_len = file.len()?;
        let n = hdr.gd_entries();
        let gd = read_dir(&file, hdr.gd_offset, n, file_len)?;
        let rgd = if hdr.has_rgd() {
            read_dir(&file, hdr.rgd_offset, n, file_len)?
        } else {
            Vec::new()
        };
        let (gd, rgd) = (Arc::new(RwLock::new(gd)), Arc::new(RwLock::new(rgd)));
        let end = file_len.div_ceil(SECTOR) * SECTOR;
        let shared_end = Arc::new(AtomicU64::new(end));
        Ok(Sparse {
            file_no,
            cache: TableCache::new(hdr.gt_bytes() as usize, cache_size),
            io: GtIo {
                file: file.clone(),
                gd: gd.clone(),
                rgd: rgd.clone(),
                needs_sync: AtomicBool::new(false),
                end: shared_end.clone(),
                free,
            },
            gd,
            rgd,
            gd_dirty: AtomicBool::new(false),
            alloc: Mutex::new(Alloc { end, file_len }),
            end: shared_end,
            grains_allocated: AtomicU64::new(0),
            file,
            hdr,
            len,
        })
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn grain(&self) -> u64 {
        self.hdr.grain_bytes()
    }

    /// The GT for extent offset `off`: None when the directory has no table there.
    fn gt_for(&self, off: u64) -> Result<Option<u64>> {
        let idx = off / self.hdr.gt_span();
        let Some(&sector) = self.gd.read().get(idx as usize) else {
            return Err(Error::corrupt(format!(
                "VMDK offset {off:#x} lies past the extent's grain directory"
            )));
        };
        if sector == 0 {
            return Ok(None);
        }
        let end = self.end.load(Ordering::SeqCst);
        if sector as u64 * SECTOR + self.hdr.gt_bytes() > end {
            return Err(Error::corrupt(format!(
                "VMDK grain directory entry {idx} points at sector {sector}, outside the file"
            )));
        }
        Ok(Some(idx))
    }

    fn classify(&self, raw: u32, end: u64) -> Result<Entry> {
        match raw {
            0 => Ok(Entry::Unalloc),
            GTE_ZEROED if self.hdr.zero_grain() => Ok(Entry::Zero),
            s => {
                let host = s as u64 * SECTOR;
                // A compressed grain is shorter than a grain; a plain one must fit.
                let need = if self.hdr.compressed() {
                    1
                } else {
                    self.grain()
                };
                if host + need > end {
                    return Err(Error::corrupt(format!(
                        "VMDK grain table entry points at sector {s}, outside the file"
                    )));
                }
                Ok(Entry::Grain(host))
            }
        }
    }

    /// The run of same-kind grains at extent offset `off` (at most `len` bytes, within one GT).
    fn run_at(&self, off: u64, len: u64) -> Result<(Entry, u64)> {
        let span = self.hdr.gt_span();
        let len = len.min(span - off % span);
        let Some(idx) = self.gt_for(off)? else {
            return Ok((Entry::Unalloc, len));
        };
        self.run_in(idx, off, len)
    }

    fn run_in(&self, idx: u64, off: u64, len: u64) -> Result<(Entry, u64)> {
        let g = self.grain();
        let end = self.end.load(Ordering::SeqCst);
        let first = ((off % self.hdr.gt_span()) / g) as usize;
        let in_grain = off % g;
        let grains = (in_grain + len).div_ceil(g) as usize;
        let compressed = self.hdr.compressed();
        let (kind, n) = self
            .cache
            .with(&self.io, idx, |t| -> Result<(Entry, usize)> {
                let e0 = self.classify(le32(t, first * 4), end)?;
                let mut n = 1;
                while n < grains && !compressed {
                    let e = self.classify(le32(t, (first + n) * 4), end)?;
                    if !e0.continued_by(e, n, g) {
                        break;
                    }
                    n += 1;
                }
                Ok((e0, n))
            })??;
        let run = (n as u64 * g - in_grain).min(len);
        Ok((kind, run))
    }

    /// Map extent offset `off` for reading; `guest_len` bounds the run.
    pub fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (e, n) = self.run_at(off, len)?;
        Ok(match e {
            Entry::Unalloc => Extent::Backing { len: n },
            Entry::Zero => Extent::Zero { len: n },
            Entry::Grain(_) if self.hdr.compressed() => Extent::Format { len: n },
            Entry::Grain(host) => Extent::InFile {
                file: self.file_no,
                host: host + off % self.grain(),
                len: n,
            },
        })
    }

    /// Read part of one compressed grain (`buf` lies inside the grain holding `off`).
    pub fn read_compressed(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let (e, _) = self.run_at(off, buf.len() as u64)?;
        let Entry::Grain(host) = e else {
            return Err(Error::corrupt("VMDK compressed grain vanished"));
        };
        let grain = stream::read_grain(&self.file, &self.hdr, host)?;
        let at = (off % self.grain()) as usize;
        buf.copy_from_slice(&grain[at..at + buf.len()]);
        Ok(())
    }

    /// Make `[off, off+len)` (extent offsets; `guest` is the guest offset of `off`) writable.
    pub fn map_write(&self, off: u64, len: u64, guest: u64, below: &dyn Below) -> Result<Extent> {
        let (e, n) = self.run_at(off, len)?;
        if let Entry::Grain(host) = e {
            return Ok(Extent::InFile {
                file: self.file_no,
                host: host + off % self.grain(),
                len: n,
            });
        }
        // Copy-on-write source read before the allocation lock: the extent ends at guest offset
        // `guest - off + self.len`, past which below reads as zeros.
        let g = self.grain();
        let pre = match e {
            Entry::Unalloc => {
                let start = guest - off % g;
                Prefetched::read(below, start, g, (guest, len), guest - off + self.len)?
            }
            _ => None,
        };
        let cow = Cow {
            below,
            guest_base: guest - off,
            pre: pre.as_ref(),
        };
        self.allocate(off, len, &cow)
    }

    /// Allocate grains at the end of the file for `[off, off+len)` (one GT at most), filling
    /// the parts of them the write does not cover before any table points at them.
    fn allocate(&self, off: u64, len: u64, cow: &Cow) -> Result<Extent> {
        let mut a = self.alloc.lock();
        let idx = self.gt_for_write(&mut a, off)?;
        let span = self.hdr.gt_span();
        let len = len.min(span - off % span);
        let (first_kind, run) = self.run_in(idx, off, len)?;
        if let Entry::Grain(host) = first_kind {
            // Another writer allocated it meanwhile.
            return Ok(Extent::InFile {
                file: self.file_no,
                host: host + off % self.grain(),
                len: run,
            });
        }
        let g = self.grain();
        let gstart = off - off % g;
        let want_end = (off + len).div_ceil(g) * g;
        let mut kinds = vec![first_kind];
        let mut pos = gstart + g;
        while pos < want_end {
            let (k, _) = self.run_in(idx, pos, g)?;
            if matches!(k, Entry::Grain(_)) {
                break;
            }
            kinds.push(k);
            pos += g;
        }
        let n = kinds.len() as u64;
        let run_end = gstart + n * g;
        let host = a.end;
        let host_end = host + n * g;
        if host_end / SECTOR > u32::MAX as u64 {
            return Err(Error::unsupported("VMDK extent would grow past 2 TiB"));
        }
        let data_end = (off + len).min(run_end);
        self.fill(&a, host, gstart, off - gstart, kinds[0], cow)?;
        let tail = data_end - gstart;
        let tail_kind = kinds[kinds.len() - 1];
        self.fill(
            &a,
            host + tail,
            data_end,
            run_end - data_end,
            tail_kind,
            cow,
        )?;
        if a.file_len < host_end {
            self.file.set_len(host_end)?;
            a.file_len = host_end;
        }
        a.end = host_end;
        self.end.store(host_end, Ordering::SeqCst);
        self.io.needs_sync.store(true, Ordering::SeqCst);
        let first = ((gstart % span) / g) as usize;
        self.cache.with_mut(&self.io, idx, |t| {
            for i in 0..n as usize {
                let s = ((host + i as u64 * g) / SECTOR) as u32;
                t[(first + i) * 4..(first + i) * 4 + 4].copy_from_slice(&s.to_le_bytes());
            }
        })?;
        self.grains_allocated.fetch_add(n, Ordering::Relaxed);
        Ok(Extent::InFile {
            file: self.file_no,
            host: host + (off - gstart),
            len: data_end - off,
        })
    }

    /// Fill `len` bytes of a new grain at `host` for extent offset `off`: zeros for a zeroed
    /// grain, the backing chain (prefetched where `cow.pre` covers it) for an unallocated one.
    fn fill(&self, a: &Alloc, host: u64, off: u64, len: u64, kind: Entry, cow: &Cow) -> Result<()> {
        let fill = if kind == Entry::Unalloc {
            let extent_end = cow.guest_base + self.len;
            Prefetched::fill(cow.pre, cow.below, cow.guest_base + off, len, extent_end)
        } else {
            Fill::Zeros
        };
        write_fill(&self.file, host, len as usize, fill, host >= a.file_len)
    }

    /// The GT index for `off`, allocating a zeroed table (and its redundant copy) at the end of
    /// the file when the directory has none. The directory entry is written at flush, after
    /// the table.
    fn gt_for_write(&self, a: &mut Alloc, off: u64) -> Result<u64> {
        if let Some(idx) = self.gt_for(off)? {
            return Ok(idx);
        }
        let idx = off / self.hdr.gt_span();
        let bytes = self.hdr.gt_bytes().div_ceil(SECTOR) * SECTOR;
        let primary = a.end;
        a.end += bytes;
        let redundant = if self.hdr.has_rgd() {
            let r = a.end;
            a.end += bytes;
            Some(r)
        } else {
            None
        };
        if primary / SECTOR > u32::MAX as u64 || a.end / SECTOR > u32::MAX as u64 {
            return Err(Error::unsupported("VMDK extent would grow past 2 TiB"));
        }
        self.end.store(a.end, Ordering::SeqCst);
        if let Some(r) = redundant {
            self.rgd.write()[idx as usize] = (r / SECTOR) as u32;
        }
        self.gd.write()[idx as usize] = (primary / SECTOR) as u32;
        let zeroed = vec![0u8; self.hdr.gt_bytes() as usize].into_boxed_slice();
        self.cache.insert_new(&self.io, idx, zeroed)?;
        self.gd_dirty.store(true, Ordering::SeqCst);
        Ok(idx)
    }

    /// Make whole grains in `[off, off+len)` read as zeros through zeroed-grain entries.
    /// False when the extent has no zeroed-grain flag (the engine then writes zeros).
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool, backing: bool) -> Result<bool> {
        let g = self.grain();
        if !self.hdr.zero_grain() || !off.is_multiple_of(g) || !len.is_multiple_of(g) {
            return Ok(false);
        }
        let mut a = self.alloc.lock();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (e, n) = self.run_at(pos, end - pos)?;
            match e {
                Entry::Zero => {}
                Entry::Unalloc if !backing => {}
                Entry::Grain(host) if !unmap => self.file.write_zeroes(host + pos % g, n)?,
                _ => {
                    // A freed grain stays in the file (a leak, as in QEMU); its space is
                    // returned to the host.
                    if let Entry::Grain(host) = e {
                        self.file.punch_hole(host + pos % g, n)?;
                    }
                    let idx = self.gt_for_write(&mut a, pos)?;
                    let first = ((pos % self.hdr.gt_span()) / g) as usize;
                    let count = n.div_ceil(g) as usize;
                    self.cache.with_mut(&self.io, idx, |t| {
                        for i in first..first + count {
                            t[i * 4..i * 4 + 4].copy_from_slice(&GTE_ZEROED.to_le_bytes());
                        }
                    })?;
                }
            }
            pos += n;
        }
        Ok(true)
    }

    /// Write back tables and directories in the safe order, syncing between steps.
    pub fn flush(&self) -> Result<()> {
        let _a = self.alloc.lock();
        self.io.sync_grains()?;
        self.io.needs_sync.store(false, Ordering::SeqCst);
        if self.cache.is_dirty() {
            self.cache.flush(&self.io)?;
            self.file.sync()?;
        }
        if self.gd_dirty.swap(false, Ordering::SeqCst) {
            let r = self.write_dirs().and_then(|_| self.file.sync());
            if r.is_err() {
                self.gd_dirty.store(true, Ordering::SeqCst);
            }
            r?;
        }
        Ok(())
    }

    fn write_dirs(&self) -> Result<()> {
        let gd = dir_bytes(&self.gd.read());
        self.file.write_all_at(&gd, self.hdr.gd_offset * SECTOR)?;
        if self.hdr.has_rgd() {
            let rgd = dir_bytes(&self.rgd.read());
            self.file.write_all_at(&rgd, self.hdr.rgd_offset * SECTOR)?;
        }
        Ok(())
    }

    /// For `check`: every GD entry and every grain the tables point at.
    pub fn tables(&self) -> Result<Vec<(u64, Result<Vec<u32>>)>> {
        let gd = self.gd.read().clone();
        let mut out = Vec::new();
        for (i, &s) in gd.iter().enumerate() {
            if s == 0 {
                continue;
            }
            let t = self
                .gt_for(i as u64 * self.hdr.gt_span())
                .and_then(|_| self.cache.with(&self.io, i as u64, |t| t.to_vec()))
                .map(|t| t.chunks_exact(4).map(|c| le32(c, 0)).collect());
            out.push((i as u64, t));
        }
        Ok(out)
    }

    pub fn gd_snapshot(&self) -> (Vec<u32>, Vec<u32>) {
        (self.gd.read().clone(), self.rgd.read().clone())
    }

    pub fn alloc_end(&self) -> u64 {
        self.end.load(Ordering::SeqCst)
    }
}

/// What an allocating write fills new grains from: the chain below, the guest offset of extent
/// offset 0, and the grain prefetched before the allocation lock (if any).
struct Cow<'a> {
    below: &'a dyn Below,
    guest_base: u64,
    pre: Option<&'a Prefetched>,
}
