//! The VDI block map: one u32 per block, little-endian.
//!
//! ```text
//!  entry < 0xfffffffe  block index: data at offset_data + index * block_size
//!  0xfffffffe          zero block (reads as zeros, even over a parent)
//!  0xffffffff          unallocated: zeros, or the parent's bytes in a differencing image
//! ```
//!
//! New blocks take the next index at the end of the file. Write-back order: block data ->
//! sync -> map entries -> sync -> header allocated-block count -> sync. A power cut between
//! the last two leaves a count one short, which `check -r` and the next read-write open fix.

use super::header::{Header, SECTOR};
use crate::cache::{store_after_sync, TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::{
    write_fill, BackingRef, Below, BlockMap, Extent, Fill, FormatStats, ImageInfo, Prefetched,
};
use crate::formats::le32;
use crate::host::HostFile;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const FREE: u32 = 0xffff_ffff;
pub const ZERO: u32 = 0xffff_fffe;
const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Free,
    Zero,
    Block(u32),
}

pub fn classify(e: u32) -> Entry {
    match e {
        FREE => Entry::Free,
        ZERO => Entry::Zero,
        i => Entry::Block(i),
    }
}

/// Stores map pages only after the blocks they point at are durable.
struct MapIo {
    file: HostFile,
    needs_sync: AtomicBool,
    bmap_end: u64,
}

impl TableIo for MapIo {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let n = buf.len().min(self.bmap_end.saturating_sub(off) as usize);
        buf[n..].fill(0xff);
        self.file.read_exact_at(&mut buf[..n], off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        let n = buf.len().min(self.bmap_end.saturating_sub(off) as usize);
        store_after_sync(&self.file, &self.needs_sync, off, &buf[..n])
    }
}

struct Alloc {
    /// Next block index to hand out.
    next: u32,
    /// Header as on disk and as it should become.
    count_on_disk: u32,
    count: u32,
    file_len: u64,
}

pub struct VdiMap {
    file: HostFile,
    read_only: bool,
    pub hdr: Header,
    bs: u64,
    cache: TableCache,
    io: MapIo,
    alloc: Mutex<Alloc>,
    /// Blocks handed out (index bound for validation without the lock).
    next: AtomicU64,
    blocks_allocated: AtomicU64,
}

impl VdiMap {
    pub fn open(file: HostFile, hdr: Header, read_only: bool, cache_size: u64) -> Result<VdiMap> {
        let file_len = file.len()?;
        let bmap_end = hdr.offset_bmap as u64 + hdr.blocks_in_image as u64 * 4;
        let map = VdiMap {
            cache: TableCache::new(PAGE as usize, cache_size),
            io: MapIo {
                file: file.clone(),
                needs_sync: AtomicBool::new(false),
                bmap_end,
            },
            alloc: Mutex::new(Alloc {
                next: 0,
                count_on_disk: hdr.blocks_allocated,
                count: 0,
                file_len,
            }),
            next: AtomicU64::new(0),
            blocks_allocated: AtomicU64::new(0),
            bs: hdr.block_size as u64,
            file,
            read_only,
            hdr,
        };
        // Entries at or past the blocks the file holds fail their own reads.
        let held = (file_len.saturating_sub(map.hdr.offset_data as u64)).div_ceil(map.bs);
        let (count, mut max_next) = map.scan(held)?;
        if !read_only && max_next > count {
            // An unused index below a used one: QEMU and VirtualBox would overwrite a block.
            let mut entries = read_entries(&map.file, &map.hdr)?;
            if sound(&entries, &map.hdr, held) {
                let moved = compact(&map.file, &map.hdr, &mut entries)?;
                log::warn!(
                    "{}: moved {moved} VDI block(s) down into unused indices left by a power cut",
                    map.file.path().display()
                );
                max_next = count;
            }
        }
        {
            let mut a = map.alloc.lock();
            a.count = count;
            // Read-write: the next index is the count (used indices are 0..count now), never
            // a header count above it, which would leave a hole QEMU would later fill wrongly.
            a.next = if read_only {
                max_next.max(map.hdr.blocks_allocated.min(held as u32))
            } else {
                max_next
            };
            map.next.store(a.next as u64, Ordering::SeqCst);
            if !read_only && a.count != a.count_on_disk {
                // A power cut between the map and the header write: fix the count now.
                map.write_header(&mut a)?;
            }
        }
        Ok(map)
    }

    /// (allocated entries, 1 + highest index held in the file).
    fn scan(&self, held: u64) -> Result<(u32, u32)> {
        let (mut count, mut next) = (0u32, 0u32);
        let mut buf = vec![0u8; (PAGE * 64) as usize];
        let n_entries = self.hdr.blocks_in_image as u64;
        let mut i = 0;
        while i < n_entries {
            let n = ((n_entries - i) * 4).min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], self.hdr.offset_bmap as u64 + i * 4)?;
            for c in buf[..n].chunks_exact(4) {
                if let Entry::Block(idx) = classify(le32(c, 0)) {
                    count += 1;
                    if (idx as u64) < held && idx < self.hdr.blocks_in_image {
                        next = next.max(idx + 1);
                    }
                }
            }
            i += n as u64 / 4;
        }
        Ok((count, next))
    }

    fn page_of(&self, block: u64) -> (u64, usize) {
        let rel = block * 4;
        (
            self.hdr.offset_bmap as u64 + rel / PAGE * PAGE,
            (rel % PAGE) as usize,
        )
    }

    /// Entry of `block` and how many following entries (within `max` and its page) are alike:
    /// the same non-data kind, or consecutive indices (contiguous data).
    fn entry_run(&self, block: u64, max: u64) -> Result<(Entry, u64)> {
        let (page, at) = self.page_of(block);
        let limit = max
            .min((PAGE as usize - at) as u64 / 4)
            .min(self.hdr.blocks_in_image as u64 - block);
        self.cache.with(&self.io, page, |p| {
            let get = |k: u64| classify(le32(p, at + k as usize * 4));
            let first = get(0);
            let mut n = 1;
            while n < limit {
                let same = match (first, get(n)) {
                    (Entry::Block(a), Entry::Block(b)) => b as u64 == a as u64 + n,
                    (a, b) => a == b,
                };
                if !same {
                    break;
                }
                n += 1;
            }
            (first, n)
        })
    }

    fn entry_pos(&self, block: u64) -> u64 {
        self.hdr.offset_bmap as u64 + block * 4
    }

    /// Host offset of block index `idx`, validated against what has been allocated.
    fn data_host(&self, block: u64, idx: u32) -> Result<u64> {
        if idx >= self.hdr.blocks_in_image || idx as u64 >= self.next.load(Ordering::SeqCst) {
            return Err(Error::corrupt(format!(
                "VDI block map entry {block} names block {idx}, past the blocks the image holds"
            ))
            .at(self.entry_pos(block)));
        }
        Ok(self.hdr.offset_data as u64 + idx as u64 * self.bs)
    }

    fn write_header(&self, a: &mut Alloc) -> Result<()> {
        let mut h = self.hdr.clone();
        h.blocks_allocated = a.count;
        self.file.write_all_at(&h.to_bytes(), 0)?;
        self.file.sync()?;
        a.count_on_disk = a.count;
        Ok(())
    }

    fn allocate(&self, block: u64, inb: u64, n: u64, below: &dyn Below) -> Result<Extent> {
        let guest = block * self.bs;
        let size = self.hdr.disk_size;
        // Copy-on-write source (a differencing child's parent) read before the allocation lock.
        let pre = if self.hdr.is_diff() && self.entry_run(block, 1)?.0 == Entry::Free {
            Prefetched::read(below, guest, self.bs, (guest + inb, n), size)?
        } else {
            None
        };
        let mut a = self.alloc.lock();
        let (e, _) = self.entry_run(block, 1)?;
        if matches!(e, Entry::Block(_)) {
            drop(a);
            return self.map_write(block * self.bs + inb, n, below);
        }
        if a.next >= self.hdr.blocks_in_image {
            return Err(Error::corrupt(
                "VDI image has no block index left (allocated count exceeds blocks in image)",
            ));
        }
        let idx = a.next;
        let host = self.hdr.offset_data as u64 + idx as u64 * self.bs;
        let fill = |h: u64, g: u64, len: u64| -> Result<()> {
            let f = if e == Entry::Free && self.hdr.is_diff() {
                Prefetched::fill(pre.as_ref(), below, g, len, size)
            } else {
                Fill::Zeros
            };
            write_fill(&self.file, h, len as usize, f, h >= a.file_len)
        };
        fill(host, guest, inb)?;
        fill(host + inb + n, guest + inb + n, self.bs - inb - n)?;
        let end = host + self.bs;
        if a.file_len < end {
            self.file.set_len(end)?;
            a.file_len = end;
        }
        a.next += 1;
        a.count += 1;
        self.next.store(a.next as u64, Ordering::SeqCst);
        self.io.needs_sync.store(true, Ordering::SeqCst);
        let (page, at) = self.page_of(block);
        self.cache.with_mut(&self.io, page, |p| {
            p[at..at + 4].copy_from_slice(&idx.to_le_bytes())
        })?;
        self.blocks_allocated.fetch_add(1, Ordering::Relaxed);
        Ok(Extent::Data {
            host: host + inb,
            len: n,
        })
    }

    fn set_entry(&self, block: u64, v: u32) -> Result<()> {
        let (page, at) = self.page_of(block);
        self.cache.with_mut(&self.io, page, |p| {
            p[at..at + 4].copy_from_slice(&v.to_le_bytes())
        })
    }
}

impl BlockMap for VdiMap {
    fn info(&self) -> ImageInfo {
        let h = &self.hdr;
        let mut d = serde_json::Map::new();
        let kind = match h.image_type {
            super::header::TYPE_STATIC => "static",
            super::header::TYPE_DIFF => "differencing",
            _ => "dynamic",
        };
        d.insert("image_type".into(), kind.into());
        d.insert("header_size".into(), h.header_size.into());
        d.insert("blocks_in_image".into(), h.blocks_in_image.into());
        d.insert("blocks_allocated".into(), self.alloc.lock().count.into());
        d.insert(
            "uuid".into(),
            super::header::uuid_string(&h.uuid_image).into(),
        );
        d.insert(
            "uuid_modify".into(),
            super::header::uuid_string(&h.uuid_modify).into(),
        );
        if h.is_diff() {
            d.insert(
                "parent_uuid".into(),
                super::header::uuid_string(&h.uuid_link).into(),
            );
        }
        ImageInfo {
            format: "vdi",
            virtual_size: h.disk_size,
            cluster_size: self.bs,
            backing: h.is_diff().then(|| BackingRef {
                name: format!("UUID {}", super::header::uuid_string(&h.uuid_link)),
                format: Some("vdi".into()),
            }),
            details: d,
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (block, inb) = (off / self.bs, off % self.bs);
        let (e, count) = self.entry_run(block, (inb + len).div_ceil(self.bs))?;
        let run = (count * self.bs - inb).min(len);
        Ok(match e {
            Entry::Free if self.hdr.is_diff() => Extent::Backing { len: run },
            Entry::Free | Entry::Zero => Extent::Zero { len: run },
            Entry::Block(idx) => {
                let host = self.data_host(block, idx)?;
                // The run is contiguous on the host; its last block must be valid too.
                let last = idx as u64 + count - 1;
                if count > 1 {
                    self.data_host(block + count - 1, last as u32)?;
                }
                Extent::Data {
                    host: host + inb,
                    len: run,
                }
            }
        })
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        if self.read_only {
            return Err(Error::read_only("VDI image is open read-only"));
        }
        let (block, inb) = (off / self.bs, off % self.bs);
        let n = len.min(self.bs - inb);
        match self.entry_run(block, 1)?.0 {
            Entry::Block(idx) => Ok(Extent::Data {
                host: self.data_host(block, idx)? + inb,
                len: n,
            }),
            _ => self.allocate(block, inb, n, below),
        }
    }

    /// Allocated blocks are zeroed in place (punched when `unmap`; they stay allocated, as
    /// QEMU hands out new blocks by count); unallocated blocks of a differencing image become
    /// zero blocks.
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        if self.read_only {
            return Err(Error::read_only("VDI image is open read-only"));
        }
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let block = pos / self.bs;
            let n = (self.bs - pos % self.bs).min(end - pos);
            match self.entry_run(block, 1)?.0 {
                Entry::Block(idx) => {
                    let host = self.data_host(block, idx)? + pos % self.bs;
                    if unmap {
                        self.file.punch_hole(host, n)?;
                    } else {
                        self.file.write_zeroes(host, n)?;
                    }
                }
                Entry::Free if self.hdr.is_diff() && n == self.bs => {
                    let _a = self.alloc.lock();
                    if self.entry_run(block, 1)?.0 == Entry::Free {
                        self.set_entry(block, ZERO)?;
                    }
                }
                Entry::Free if self.hdr.is_diff() => return Ok(false),
                _ => {}
            }
            pos += n;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut a = self.alloc.lock();
        self.file.sync()?;
        self.io.needs_sync.store(false, Ordering::SeqCst);
        if self.cache.is_dirty() {
            self.cache.flush(&self.io)?;
            self.file.sync()?;
        }
        if a.count != a.count_on_disk {
            self.write_header(&mut a)?;
        }
        Ok(())
    }

    fn data_end(&self) -> Option<u64> {
        Some(self.hdr.offset_data as u64 + self.next.load(Ordering::SeqCst) * self.bs)
    }

    fn backing_identity(&self) -> Option<String> {
        self.hdr
            .is_diff()
            .then(|| super::header::uuid_string(&self.hdr.uuid_link))
    }

    fn check_backing(&self, parent: &ImageInfo) -> Result<()> {
        if parent.format != "vdi" {
            return Err(Error::corrupt(format!(
                "the parent of a differencing VDI must be a VDI, found a {} image",
                parent.format
            )));
        }
        let want = super::header::uuid_string(&self.hdr.uuid_parent_modify);
        let got = parent.details.get("uuid_modify").and_then(|v| v.as_str());
        if self.hdr.uuid_parent_modify != [0; 16] && got != Some(want.as_str()) {
            return Err(Error::corrupt(format!(
                "the parent's modification UUID {} is not the {want} this differencing VDI was \
                 made against: the parent changed after the child was made",
                got.unwrap_or("(none)")
            )));
        }
        if parent.virtual_size != self.hdr.disk_size {
            log::warn!(
                "differencing VDI is {} bytes, its parent {}",
                self.hdr.disk_size,
                parent.virtual_size
            );
        }
        Ok(())
    }

    fn stats(&self) -> FormatStats {
        FormatStats {
            cache: self.cache.stats(),
            clusters_allocated: self.blocks_allocated.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

/// Every block map entry, as stored.
pub fn read_entries(file: &HostFile, hdr: &Header) -> Result<Vec<u32>> {
    let mut raw = vec![0u8; hdr.blocks_in_image as usize * 4];
    file.read_exact_at(&mut raw, hdr.offset_bmap as u64)?;
    Ok(raw.chunks_exact(4).map(|c| le32(c, 0)).collect())
}

/// Whether every data entry names a distinct index below `held` (the blocks the file holds)
/// and the image's block count.
pub fn sound(entries: &[u32], hdr: &Header, held: u64) -> bool {
    let mut seen = vec![false; hdr.blocks_in_image as usize];
    entries.iter().all(|&e| match classify(e) {
        Entry::Block(i) if (i as u64) < held && i < hdr.blocks_in_image => {
            !std::mem::replace(&mut seen[i as usize], true)
        }
        Entry::Block(_) => false,
        _ => true,
    })
}

/// Make the used block indices exactly `0..count` again. QEMU and VirtualBox hand out the next
/// block at the header's allocated count, so an unused index below a used one (a power cut kept
/// a later allocation's map entry but lost an earlier one's, or tore a map page) would make them
/// overwrite a block in use. Each block at or above the count is copied into a hole below it;
/// all copies are synced before any map entry (4 bytes, one sector) is switched, then those are
/// synced: a cut anywhere leaves every entry pointing at its data. `entries` must be `sound`;
/// returns how many blocks moved (the caller rewrites the header's count).
pub fn compact(file: &HostFile, hdr: &Header, entries: &mut [u32]) -> Result<u32> {
    let bs = hdr.block_size as u64;
    let data = hdr.offset_data as u64;
    let index = |e: u32| match classify(e) {
        Entry::Block(i) => Some(i),
        _ => None,
    };
    let count = entries.iter().filter_map(|&e| index(e)).count();
    let mut used = vec![false; count];
    let mut above = vec![];
    for (pos, &e) in entries.iter().enumerate() {
        match index(e) {
            Some(i) if (i as usize) < count => used[i as usize] = true,
            Some(_) => above.push(pos),
            None => {}
        }
    }
    let holes = (0..count as u32).filter(|&i| !used[i as usize]);
    let moves: Vec<(usize, u32)> = above.into_iter().zip(holes).collect();
    let mut buf = vec![0u8; bs.min(1 << 20) as usize];
    for &(pos, to) in &moves {
        let (src, dst) = (data + entries[pos] as u64 * bs, data + to as u64 * bs);
        let mut done = 0;
        while done < bs {
            let n = (bs - done).min(buf.len() as u64) as usize;
            file.read_zerofill(&mut buf[..n], src + done)?;
            file.write_all_at(&buf[..n], dst + done)?;
            done += n as u64;
        }
    }
    if moves.is_empty() {
        return Ok(0);
    }
    file.sync()?;
    for &(pos, to) in &moves {
        file.write_all_at(&to.to_le_bytes(), hdr.offset_bmap as u64 + pos as u64 * 4)?;
        entries[pos] = to;
    }
    file.sync()?;
    Ok(moves.len() as u32)
}

/// Sector-aligned size of a block map of `blocks` entries.
pub fn bmap_bytes(blocks: u32) -> u64 {
    (blocks as u64 * 4).div_ceil(SECTOR) * SECTOR
}
