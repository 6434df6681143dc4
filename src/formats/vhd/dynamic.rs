//! Dynamic and differencing VHDs: the dynamic disk header, the block allocation table (BAT) and
//! the per-block sector bitmaps.
//!
//! ```text
//!  [footer copy][dynamic header 1024][BAT: u32 sector offsets][ locator data ]
//!  [bitmap|block data][bitmap|block data] ... [footer]
//!   bitmap: one bit per 512-byte sector, most significant bit first, padded to 512 bytes;
//!           set = the sector is stored here (differencing: clear = read the parent)
//! ```
//!
//! Dynamic header (big-endian): 0 "cxsparse", 8 data offset, 16 table (BAT) offset, 24 version,
//! 28 max table entries, 32 block size, 36 checksum, 40 parent unique id, 56 parent time stamp,
//! 64 parent name (UTF-16BE, 512 bytes), 576 eight parent locators.
//!
//! A block is allocated where the footer is (padded so that its data starts on a 4 KiB
//! boundary): the new footer is written past the new block and synced, then the bitmap (after
//! zeros over the old footer) overwrites the old footer, and only after the next sync (of the
//! guest data) does the BAT entry reach the disk. A power cut leaves at worst an unreferenced
//! block, never an entry pointing at garbage.

use super::footer::{DiskType, Footer, SECTOR};
use super::parent::{self, Locator, LOCATORS, LOCATOR_AT, MAX_LOCATOR_LEN};
use crate::cache::{store_after_sync, TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::{is_zero, BackingRef, Below, BlockMap, Extent, FormatStats, ImageInfo};
use crate::formats::{be32, be64};
use crate::host::HostFile;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
pub const HEADER_LEN: usize = 1024;
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// BAT bytes per cache page.
const PAGE: u64 = 4096;
/// Host page size block data is aligned to.
const HOST_PAGE: u64 = 4096;
/// A write's edge sectors read from the parent: (first sector, bytes) per run.
type Edges = Vec<(u64, Vec<u8>)>;
/// Largest block size accepted (QEMU accepts any power of two; 2 MiB is the norm).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_id: [u8; 16],
    pub parent_timestamp: u32,
    /// Parent file name, UTF-16BE as stored.
    pub parent_name: [u8; 512],
    pub locators: [Locator; LOCATORS],
}

impl DynHeader {
    pub fn parse(b: &[u8]) -> Result<DynHeader> {
        if b.len() < HEADER_LEN || &b[..8] != HEADER_COOKIE {
            return Err(Error::corrupt(
                "no VHD dynamic disk header (\"cxsparse\" cookie missing)",
            ));
        }
        let stored = be32(b, 36);
        let computed = super::footer::checksum(&b[..HEADER_LEN], 36);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD dynamic header checksum {stored:#010x} does not match its contents \
                 ({computed:#010x})"
            )));
        }
        let mut locators = [Locator::default(); LOCATORS];
        for (i, l) in locators.iter_mut().enumerate() {
            *l = Locator::parse(&b[LOCATOR_AT + i * 24..LOCATOR_AT + i * 24 + 24]);
        }
        Ok(DynHeader {
            table_offset: be64(b, 16),
            version: be32(b, 24),
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_id: b[40..56].try_into().expect("16 bytes"),
            parent_timestamp: be32(b, 56),
            parent_name: b[64..576].try_into().expect("512 bytes"),
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        b[64..576].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            l.write(&mut b[LOCATOR_AT + i * 24..LOCATOR_AT + i * 24 + 24]);
        }
        let c = super::footer::checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn parent_name(&self) -> String {
        parent::utf16_decode(&self.parent_name, true)
    }
}

/// Sizes derived from a validated header.
#[derive(Debug, Clone, Copy)]
pub struct Geo {
    pub block_size: u64,
    pub bitmap_size: u64,
    pub bat_offset: u64,
    pub entries: u64,
    pub header_offset: u64,
}

impl Geo {
    pub fn new(h: &DynHeader, header_offset: u64, virtual_size: u64, file_len: u64) -> Result<Geo> {
        let bs = h.block_size;
        if !bs.is_power_of_two() || !(SECTOR as u32..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(Error::unsupported(format!(
                "VHD block size {bs} is not a power of two between 512 and {MAX_BLOCK_SIZE}"
            )));
        }
        let block_size = bs as u64;
        let entries = h.max_table_entries as u64;
        if entries * block_size < virtual_size {
            return Err(Error::corrupt(format!(
                "VHD BAT of {entries} entries maps less than the disk size {virtual_size}"
            )));
        }
        let bat_end = h.table_offset.checked_add(entries * 4);
        if !h.table_offset.is_multiple_of(SECTOR) || bat_end.is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "VHD BAT at {:#x} ({entries} entries) lies outside the file ({file_len:#x})",
                h.table_offset
            )));
        }
        Ok(Geo {
            block_size,
            bitmap_size: (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR,
            bat_offset: h.table_offset,
            entries,
            header_offset,
        })
    }

    pub fn bat_end(&self) -> u64 {
        self.bat_offset + self.entries * 4
    }
    fn page_of(&self, idx: u64) -> (u64, usize) {
        let rel = idx * 4;
        (self.bat_offset + rel / PAGE * PAGE, (rel % PAGE) as usize)
    }
    /// Does a block (bitmap + data) at `host` overlap the footer copy, header or BAT?
    pub fn overlaps_metadata(&self, host: u64) -> bool {
        let end = host + self.bitmap_size + self.block_size;
        let hits = |a: u64, b: u64| host < b && a < end;
        hits(0, 512)
            || hits(self.header_offset, self.header_offset + HEADER_LEN as u64)
            || hits(self.bat_offset, self.bat_end().div_ceil(SECTOR) * SECTOR)
    }
}

/// Loads and stores BAT pages and sector bitmaps. A table is stored only after the data it may
/// describe is durable: allocation sets `needs_sync`.
struct MetaIo {
    file: HostFile,
    needs_sync: AtomicBool,
    bat_offset: u64,
    bat_end: u64,
}

impl MetaIo {
    /// BAT pages are cut at the end of the BAT (its padding is left alone).
    fn span(&self, off: u64, len: usize) -> usize {
        if (self.bat_offset..self.bat_end).contains(&off) {
            len.min((self.bat_end - off) as usize)
        } else {
            len
        }
    }
}

impl TableIo for MetaIo {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.span(off, buf.len());
        buf[n..].fill(0xff);
        self.file.read_exact_at(&mut buf[..n], off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        let n = self.span(off, buf.len());
        store_after_sync(&self.file, &self.needs_sync, off, &buf[..n])
    }
}

pub struct DynMap {
    file: HostFile,
    read_only: bool,
    pub footer: Footer,
    pub hdr: DynHeader,
    pub geo: Geo,
    virtual_size: u64,
    diff: bool,
    /// Names the parent may be found under (differencing), best first.
    parents: Vec<String>,
    bat: TableCache,
    bitmaps: TableCache,
    io: MetaIo,
    /// Where the footer is: the next block goes here. Held while allocating.
    alloc: Mutex<u64>,
    /// Copy of the allocator's end for lock-free validation of BAT entries.
    data_end: AtomicU64,
    blocks_allocated: AtomicU64,
}

/// First byte past every block the BAT points at (and past the BAT), 512-aligned. Entries
/// pointing past the end of the file are left out: they fail their own reads.
pub fn scan_end(file: &HostFile, g: &Geo) -> Result<u64> {
    let file_len = file.len()?;
    let mut end = g.bat_end().div_ceil(SECTOR) * SECTOR;
    let mut buf = vec![0u8; (g.entries * 4).min(PAGE * 256) as usize];
    let mut idx = 0;
    while idx < g.entries {
        let n = ((g.entries - idx) * 4).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], g.bat_offset + idx * 4)?;
        for e in buf[..n].chunks_exact(4) {
            let e = u32::from_be_bytes(e.try_into().expect("4 bytes"));
            let block_end = e as u64 * SECTOR + g.bitmap_size + g.block_size;
            if e != UNALLOCATED && block_end <= file_len {
                end = end.max(block_end);
            }
        }
        idx += n as u64 / 4;
    }
    Ok(end)
}

impl DynMap {
    pub fn open(
        file: HostFile,
        footer: Footer,
        read_only: bool,
        cache_size: u64,
    ) -> Result<DynMap> {
        let file_len = file.len()?;
        let hoff = footer.data_offset;
        if !hoff.is_multiple_of(SECTOR)
            || hoff
                .checked_add(HEADER_LEN as u64)
                .is_none_or(|e| e > file_len)
        {
            return Err(Error::corrupt(format!(
                "VHD dynamic header offset {hoff:#x} lies outside the file ({file_len:#x})"
            ))
            .at(16));
        }
        let mut hb = vec![0u8; HEADER_LEN];
        file.read_exact_at(&mut hb, hoff)?;
        let hdr = DynHeader::parse(&hb).map_err(|e| e.at(hoff))?;
        let virtual_size = footer.virtual_size();
        let geo = Geo::new(&hdr, hoff, virtual_size, file_len).map_err(|e| e.at(hoff))?;
        let diff = footer.disk_type == DiskType::Differencing;
        let parents = if diff {
            let read = |l: &Locator| -> Result<Vec<u8>> {
                if l.data_len > MAX_LOCATOR_LEN
                    || l.offset
                        .checked_add(l.data_len as u64)
                        .is_none_or(|e| e > file_len)
                {
                    return Err(Error::corrupt(format!(
                        "VHD parent locator at {:#x} ({} bytes) lies outside the file or is too long",
                        l.offset, l.data_len
                    ))
                    .at(hoff + LOCATOR_AT as u64));
                }
                let mut d = vec![0u8; l.data_len as usize];
                file.read_exact_at(&mut d, l.offset)?;
                Ok(d)
            };
            parent::candidates(&read, &hdr.locators, &hdr.parent_name())?
        } else {
            vec![]
        };
        // The footer sits after the last block; anything past the blocks is kept.
        let end =
            scan_end(&file, &geo)?.max(file_len.saturating_sub(512).div_ceil(SECTOR) * SECTOR);
        let bitmap_cache = if diff { cache_size / 4 } else { 0 };
        Ok(DynMap {
            io: MetaIo {
                file: file.clone(),
                needs_sync: AtomicBool::new(false),
                bat_offset: geo.bat_offset,
                bat_end: geo.bat_end(),
            },
            bat: TableCache::new(PAGE as usize, cache_size - bitmap_cache),
            bitmaps: TableCache::new(geo.bitmap_size as usize, bitmap_cache),
            alloc: Mutex::new(end),
            data_end: AtomicU64::new(end),
            blocks_allocated: AtomicU64::new(0),
            file,
            read_only,
            footer,
            hdr,
            geo,
            virtual_size,
            diff,
            parents,
        })
    }

    /// BAT entry `idx` and how many entries after it (within `max` and its page) hold the same
    /// "unallocated" state.
    fn entry_run(&self, idx: u64, max: u64) -> Result<(u32, u64)> {
        let (page, at) = self.geo.page_of(idx);
        let left = ((PAGE as usize - at) / 4) as u64;
        let limit = max.min(left).min(self.geo.entries - idx);
        self.bat.with(&self.io, page, |p| {
            let get = |k: usize| be32(p, at + k * 4);
            let first = get(0);
            let mut n = 1;
            while first == UNALLOCATED && n < limit && get(n as usize) == UNALLOCATED {
                n += 1;
            }
            (first, n)
        })
    }

    fn entry_pos(&self, idx: u64) -> u64 {
        self.geo.bat_offset + idx * 4
    }

    /// The host offset of block `idx`'s bitmap, validated against the metadata and the end of
    /// what has been allocated.
    fn block_host(&self, idx: u64, e: u32) -> Result<u64> {
        let host = e as u64 * SECTOR;
        let end = host + self.geo.bitmap_size + self.geo.block_size;
        let data_end = self.data_end.load(Ordering::SeqCst);
        if end > data_end || self.geo.overlaps_metadata(host) {
            return Err(Error::corrupt(format!(
                "VHD BAT entry {idx} points at {host:#x}, outside the data area \
                 (overlaps the headers or BAT, or ends past {data_end:#x})"
            ))
            .at(self.entry_pos(idx)));
        }
        Ok(host)
    }

    /// The run of sectors with the same bitmap bit from `inb` (at most `n` bytes): (present, len).
    fn bitmap_run(&self, host: u64, inb: u64, n: u64) -> Result<(bool, u64)> {
        let s0 = inb / SECTOR;
        let s_end = (inb + n).div_ceil(SECTOR);
        self.bitmaps.with(&self.io, host, |bm| {
            let bit = |s: u64| bm[(s / 8) as usize] & (0x80 >> (s % 8)) != 0;
            let first = bit(s0);
            let mut s = s0 + 1;
            while s < s_end && bit(s) == first {
                s += 1;
            }
            (first, (s * SECTOR - inb).min(n))
        })
    }

    fn set_bits(bm: &mut [u8], s0: u64, s1: u64) {
        for s in s0..s1 {
            bm[(s / 8) as usize] |= 0x80 >> (s % 8);
        }
    }

    /// The sectors a write of `n` bytes at `inb` marks present: whole bitmap bytes (8 sectors,
    /// 4 KiB), as libvhdi reads a differencing disk at that granularity.
    fn marked_sectors(&self, inb: u64, n: u64) -> (u64, u64) {
        let spb = self.geo.block_size / SECTOR;
        (
            inb / SECTOR / 8 * 8,
            ((inb + n).div_ceil(SECTOR).div_ceil(8) * 8).min(spb),
        )
    }

    /// The sectors a write marks present without covering them whole: the rest of its 4 KiB
    /// bitmap groups, at most two runs (one when no sector is covered whole), as [start, end).
    fn edge_runs(&self, inb: u64, n: u64) -> Vec<(u64, u64)> {
        let (m0, m1) = self.marked_sectors(inb, n);
        let (full0, full1) = (inb.div_ceil(SECTOR), (inb + n) / SECTOR);
        if full0 >= full1 {
            return vec![(m0, m1)];
        }
        [(m0, full0), (full1, m1)]
            .into_iter()
            .filter(|(s, e)| s < e)
            .collect()
    }

    /// The parent's bytes of a write's edge sectors (`edge_runs`), read before the allocation
    /// lock so that other writers do not wait on the parent. They stay valid: what lies below
    /// an image does not change while it is open, and under the lock only the sectors still
    /// absent from this image are written from them.
    fn read_edges(&self, idx: u64, inb: u64, n: u64, below: &dyn Below) -> Result<Edges> {
        let guest_block = idx * self.geo.block_size;
        self.edge_runs(inb, n)
            .into_iter()
            .map(|(s, e)| {
                let len = (e - s) * SECTOR;
                let guest = guest_block + s * SECTOR;
                let mut buf = vec![0u8; len as usize];
                if !below.zeros_below(guest, len) {
                    let inside = self.virtual_size.saturating_sub(guest).min(len) as usize;
                    below.read_below(guest, &mut buf[..inside])?;
                }
                Ok((s, buf))
            })
            .collect()
    }

    /// Under the allocation lock: write the prefetched parent bytes of every edge sector that
    /// is not present yet, at `data` (the block's data area). `fresh`: the data area reads as
    /// zeros already (a new block), so zero runs are skipped.
    fn fill_edges(
        &self,
        present: &dyn Fn(u64) -> Result<bool>,
        data: u64,
        edges: &Edges,
        fresh: bool,
    ) -> Result<()> {
        for (first, bytes) in edges {
            let end = first + bytes.len() as u64 / SECTOR;
            let mut s = *first;
            while s < end {
                if present(s)? {
                    s += 1;
                    continue;
                }
                let mut e = s + 1;
                while e < end && !present(e)? {
                    e += 1;
                }
                let run = &bytes[((s - first) * SECTOR) as usize..((e - first) * SECTOR) as usize];
                if !(fresh && is_zero(run)) {
                    self.file.write_all_at(run, data + s * SECTOR)?;
                }
                s = e;
            }
        }
        Ok(())
    }

    /// Differencing: mark the sectors of a write into an allocated block present, first filling
    /// the sectors around it from the parent (read before the lock).
    fn mark_present(&self, idx: u64, host: u64, inb: u64, n: u64, below: &dyn Below) -> Result<()> {
        let (s0, s1) = self.marked_sectors(inb, n);
        let (all, len) = self.bitmap_run(host, s0 * SECTOR, (s1 - s0) * SECTOR)?;
        if all && len >= (s1 - s0) * SECTOR {
            return Ok(());
        }
        let edges = self.read_edges(idx, inb, n, below)?;
        let _a = self.alloc.lock();
        let present = |s: u64| -> Result<bool> { Ok(self.bitmap_run(host, s * SECTOR, SECTOR)?.0) };
        self.fill_edges(&present, host + self.geo.bitmap_size, &edges, false)?;
        self.io.needs_sync.store(true, Ordering::SeqCst);
        self.bitmaps
            .with_mut(&self.io, host, |bm| Self::set_bits(bm, s0, s1))
    }

    /// Where a block goes when the footer is at `end`: there, or a little further so that its
    /// data (after the sector bitmap) starts on a 4 KiB boundary. Unaligned data makes every
    /// 4 KiB guest write a read-modify-write of two host pages (docs/performance.md); the spec
    /// lets blocks lie anywhere, and Xen's blktap places them the same way.
    pub fn block_start(g: &Geo, end: u64) -> u64 {
        if g.block_size.is_multiple_of(HOST_PAGE) {
            (end + g.bitmap_size).next_multiple_of(HOST_PAGE) - g.bitmap_size
        } else {
            end
        }
    }

    /// Allocate block `idx` at the end of the file for a write of `n` bytes at `inb`.
    fn allocate(&self, idx: u64, inb: u64, n: u64, below: &dyn Below) -> Result<Extent> {
        let edges = if self.diff {
            self.read_edges(idx, inb, n, below)?
        } else {
            Vec::new()
        };
        let mut end = self.alloc.lock();
        let (e, _) = self.entry_run(idx, 1)?;
        if e != UNALLOCATED {
            drop(end);
            return self.map_write(idx * self.geo.block_size + inb, n, below);
        }
        let g = self.geo;
        let host = Self::block_start(&g, *end);
        let new_end = host + g.bitmap_size + g.block_size;
        if new_end / SECTOR > u32::MAX as u64 {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                "VHD file would grow past the 2 TiB a BAT entry can address",
            ));
        }
        // 1. The footer past the new block, durable before the old one is overwritten.
        self.file.write_all_at(&self.footer.to_bytes(), new_end)?;
        self.file.sync()?;
        // 2. The bitmap (after zeros over the old footer, when the block starts further on);
        // the data area past it reads as zeros.
        let pad = (host - *end) as usize;
        let mut bm = vec![0u8; pad + g.bitmap_size as usize];
        if self.diff {
            let data = host + g.bitmap_size;
            self.fill_edges(&|_| Ok(false), data, &edges, true)?;
            let (s0, s1) = self.marked_sectors(inb, n);
            Self::set_bits(&mut bm[pad..], s0, s1);
        } else {
            bm[pad..].fill(0xff);
        }
        self.file.write_all_at(&bm, *end)?;
        *end = new_end;
        self.data_end.store(new_end, Ordering::SeqCst);
        // 3. The BAT entry, stored only after the next sync.
        self.io.needs_sync.store(true, Ordering::SeqCst);
        let (page, at) = g.page_of(idx);
        let v = (host / SECTOR) as u32;
        self.bat.with_mut(&self.io, page, |p| {
            p[at..at + 4].copy_from_slice(&v.to_be_bytes())
        })?;
        self.blocks_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(Extent::Data {
            host: host + g.bitmap_size + inb,
            len: n,
        })
    }

    fn flush_tables(&self) -> Result<()> {
        self.file.sync()?;
        self.io.needs_sync.store(false, Ordering::SeqCst);
        let dirty = self.bitmaps.is_dirty() || self.bat.is_dirty();
        self.bitmaps.flush(&self.io)?;
        self.bat.flush(&self.io)?;
        if dirty {
            self.file.sync()?;
        }
        Ok(())
    }

    /// Every BAT entry, for `check`.
    pub fn entries(&self) -> Result<Vec<u32>> {
        (0..self.geo.entries)
            .map(|i| self.entry_run(i, 1).map(|(e, _)| e))
            .collect()
    }
}

pub fn uuid_string(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}

impl BlockMap for DynMap {
    fn info(&self) -> ImageInfo {
        let mut d = super::footer_details(&self.footer);
        d.insert("block_size".into(), self.geo.block_size.into());
        d.insert("bat_entries".into(), self.geo.entries.into());
        if self.diff {
            d.insert(
                "parent_unique_id".into(),
                uuid_string(&self.hdr.parent_id).into(),
            );
            d.insert("parent_name".into(), self.hdr.parent_name().into());
            d.insert("parent_candidates".into(), self.parents.clone().into());
        }
        ImageInfo {
            format: "vpc",
            virtual_size: self.virtual_size,
            cluster_size: self.geo.block_size,
            backing: self.parents.first().map(|name| BackingRef {
                name: name.clone(),
                format: Some("vpc".into()),
            }),
            details: d,
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let bs = self.geo.block_size;
        let (idx, inb) = (off / bs, off % bs);
        let n = len.min(bs - inb);
        let (e, count) = self.entry_run(idx, (inb + len).div_ceil(bs))?;
        if e == UNALLOCATED {
            let run = (count * bs - inb).min(len);
            return Ok(if self.diff {
                Extent::Backing { len: run }
            } else {
                Extent::Zero { len: run }
            });
        }
        let host = self.block_host(idx, e)?;
        let data = host + self.geo.bitmap_size + inb;
        if !self.diff {
            return Ok(Extent::Data { host: data, len: n });
        }
        let (present, run) = self.bitmap_run(host, inb, n)?;
        Ok(if present {
            Extent::Data {
                host: data,
                len: run,
            }
        } else {
            Extent::Backing { len: run }
        })
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        if self.read_only {
            return Err(Error::read_only("VHD image is open read-only"));
        }
        let bs = self.geo.block_size;
        let (idx, inb) = (off / bs, off % bs);
        let n = len.min(bs - inb);
        let (e, _) = self.entry_run(idx, 1)?;
        if e == UNALLOCATED {
            return self.allocate(idx, inb, n, below);
        }
        let host = self.block_host(idx, e)?;
        if self.diff {
            self.mark_present(idx, host, inb, n, below)?;
        }
        Ok(Extent::Data {
            host: host + self.geo.bitmap_size + inb,
            len: n,
        })
    }

    /// Dynamic disks: blocks already allocated are zeroed in place (punched when `unmap`);
    /// unallocated ones read as zeros already. Differencing disks cannot hide the parent.
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        if self.read_only {
            return Err(Error::read_only("VHD image is open read-only"));
        }
        if self.diff {
            return Ok(false);
        }
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let ext = self.map_read(pos, end - pos)?;
            if let Extent::Data { host, len } = ext {
                if unmap {
                    self.file.punch_hole(host, len)?;
                } else {
                    self.file.write_zeroes(host, len)?;
                }
            }
            pos += ext.len();
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _a = self.alloc.lock();
        self.flush_tables()
    }

    fn data_end(&self) -> Option<u64> {
        Some(self.data_end.load(Ordering::SeqCst))
    }

    fn backing_alternatives(&self) -> Vec<String> {
        self.parents.iter().skip(1).cloned().collect()
    }

    fn check_backing(&self, parent: &ImageInfo) -> Result<()> {
        let want = uuid_string(&self.hdr.parent_id);
        match parent.details.get("unique_id").and_then(|v| v.as_str()) {
            _ if parent.format != "vpc" => Err(Error::corrupt(format!(
                "the parent of a differencing VHD must be a VHD, found a {} image",
                parent.format
            ))),
            Some(id) if id == want => Ok(()),
            id => Err(Error::corrupt(format!(
                "VHD parent's unique id {} does not match the one this differencing disk was \
                 made against ({want}): the parent was replaced or changed",
                id.unwrap_or("(none)")
            ))),
        }
    }

    fn stats(&self) -> FormatStats {
        let mut cache = self.bat.stats();
        let b = self.bitmaps.stats();
        cache.hits += b.hits;
        cache.misses += b.misses;
        cache.evictions += b.evictions;
        cache.writebacks += b.writebacks;
        FormatStats {
            cache,
            clusters_allocated: self.blocks_allocated.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}
