//! The open image: BAT lookups, block allocation, sector bitmaps, log-covered metadata writes.

use super::bat::{BatEntry, Geometry, Payload, PAGE_SIZE};
use super::header::{Guid, Headers, Region, RegionTable, MIB};
use super::log::{self, LogOp, NewEntry};
use super::metadata::{self, Metadata};
use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::{BackingRef, Below, BlockMap, Extent, FormatStats, ImageInfo};
use crate::formats::le64;
use crate::host::HostFile;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Largest metadata region read into memory.
const MAX_METADATA_REGION: u64 = 16 * MIB;

pub struct VhdxMap {
    pub(super) file: HostFile,
    read_only: bool,
    pub(super) geo: Geometry,
    pub(super) meta: Metadata,
    pub(super) regions: RegionTable,
    pub(super) log_region: Region,
    /// Log replayed in memory only (read-only open of an image with a dirty log).
    overlay: Vec<LogOp>,
    pub(super) log_state: &'static str,
    replayed_entries: u64,
    cache: TableCache,
    /// Changed metadata pages (BAT, sector bitmaps) not yet written in place: what lookups see
    /// before the cache. Changed only under `st`; read under a short shared lock.
    pub(super) dirty: RwLock<BTreeMap<u64, Vec<u8>>>,
    /// This session's log is started (`State::log_guid` set): writes into present blocks need
    /// no header update and take no lock.
    writing: AtomicBool,
    /// Allocation, the log and flush: the exclusive lock. Lookups never take it.
    st: Mutex<State>,
    /// Virtual size: the metadata's until a resize (resize.rs).
    pub(super) size: AtomicU64,
}

pub(super) struct State {
    pub(super) headers: Headers,
    /// Log GUID this session's entries carry (set in the header before the first entry).
    log_guid: Option<Guid>,
    log_pos: u64,
    log_seq: u64,
    /// Next free 1 MiB-aligned host offset.
    alloc_end: u64,
    /// Freed blocks, reusable; `pending_free` become free once their BAT change is durable.
    free: Vec<u64>,
    pending_free: Vec<u64>,
    entries_written: u64,
    blocks_allocated: u64,
}

struct PageIo<'a>(&'a VhdxMap);

impl TableIo for PageIo<'_> {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_meta(buf, off)
    }
    fn store(&self, off: u64, _buf: &[u8]) -> Result<()> {
        // Pages are changed only in `VhdxMap::dirty`; the cache holds clean copies.
        Err(Error::corrupt("VHDX page cache asked to store a page").at(off))
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl VhdxMap {
    pub fn open(file: HostFile, read_only: bool, cache_size: u64) -> Result<VhdxMap> {
        let mut sig = [0u8; 8];
        file.read_exact_at(&mut sig, 0)?;
        if &sig != super::header::FILE_ID_SIGNATURE {
            return Err(Error::corrupt("not a VHDX file (no \"vhdxfile\" signature)").at(0));
        }
        let mut headers = Headers::read(&file)?;
        let file_len = file.len()?;
        let h = headers.cur().clone();
        let log_region = Region {
            offset: h.log_offset,
            length: h.log_length as u64,
        };
        if log_region.length > 0 && log_region.end() > file_len {
            return Err(Error::corrupt(format!(
                "VHDX log {:#x}+{:#x} lies past the end of the file ({file_len:#x})",
                log_region.offset, log_region.length
            ))
            .at(super::header::HEADER_OFFSETS[headers.current]));
        }
        let replay = log::scan(&|b, o| file.read_exact_at(b, o), &h)?;
        let mut overlay = Vec::new();
        let mut eff_len = file_len;
        let (mut log_state, mut replayed_entries) = ("clean", 0);
        if let Some(r) = replay {
            if r.flushed_file_offset > file_len {
                return Err(Error::corrupt(format!(
                    "VHDX log entry expects a file of {:#x} bytes, the file has {file_len:#x} \
                     (truncated?)",
                    r.flushed_file_offset
                ))
                .at(log_region.offset));
            }
            replayed_entries = r.entries;
            if read_only {
                eff_len = eff_len.max(r.last_file_offset);
                overlay = r.ops;
                log_state = "dirty (replayed in memory; the file is unchanged)";
            } else {
                apply_replay(&file, &mut headers, r)?;
                log_state = "replayed at open";
            }
        }
        let mut map = VhdxMap {
            file,
            read_only,
            geo: Geometry {
                block_size: MIB,
                logical_sector: 512,
                virtual_size: 0,
                has_parent: false,
                chunk_ratio: 1,
                sectors_per_block: 1,
                data_blocks: 0,
                bat_entries: 0,
                bat: log_region,
            },
            meta: Metadata {
                block_size: MIB,
                leave_blocks_allocated: false,
                has_parent: false,
                virtual_size: 0,
                page83: Guid::ZERO,
                logical_sector: 512,
                physical_sector: 512,
                parent: vec![],
            },
            regions: RegionTable {
                bat: log_region,
                metadata: log_region,
            },
            log_region,
            overlay,
            log_state,
            replayed_entries,
            cache: TableCache::new(PAGE_SIZE as usize, cache_size),
            dirty: RwLock::new(BTreeMap::new()),
            writing: AtomicBool::new(false),
            st: Mutex::new(State {
                headers,
                log_guid: None,
                log_pos: 0,
                log_seq: 1,
                alloc_end: 0,
                free: vec![],
                pending_free: vec![],
                entries_written: 0,
                blocks_allocated: 0,
            }),
            size: AtomicU64::new(0),
        };
        map.load_tables(eff_len)?;
        Ok(map)
    }

    fn load_tables(&mut self, eff_len: u64) -> Result<()> {
        let regions = RegionTable::read(&|b, o| self.read_meta(b, o), eff_len)?;
        metadata::check_region(&regions.metadata)?;
        let mlen = regions.metadata.length.min(MAX_METADATA_REGION);
        let mut mbuf = vec![0u8; mlen as usize];
        self.read_meta(&mut mbuf, regions.metadata.offset)?;
        let meta = Metadata::parse(&mbuf, regions.metadata.offset)?;
        let geo = Geometry::new(&meta, regions.bat)?;
        let lr = self.log_region;
        if lr.length > 0
            && (lr.overlaps(regions.bat.offset, regions.bat.length)
                || lr.overlaps(regions.metadata.offset, regions.metadata.length))
        {
            return Err(
                Error::corrupt("VHDX log overlaps the BAT or metadata region").at(lr.offset),
            );
        }
        let end = [eff_len, regions.bat.end(), regions.metadata.end(), lr.end()]
            .into_iter()
            .max()
            .unwrap_or(0);
        self.st_lock().alloc_end = align_up(end, MIB);
        self.regions = regions;
        self.meta = meta;
        *self.size.get_mut() = geo.virtual_size;
        self.geo = geo;
        Ok(())
    }

    pub(super) fn st_lock(&self) -> MutexGuard<'_, State> {
        self.st.lock()
    }

    /// Metadata bytes as the (possibly replayed-in-memory) log makes them.
    fn read_meta(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file.read_zerofill(buf, off)?;
        for op in &self.overlay {
            op.patch(buf, off);
        }
        Ok(())
    }

    /// Run `f` on the current contents of metadata page `page` (changed or as on disk).
    pub(super) fn with_page<R>(&self, page: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        if let Some(p) = self.dirty.read().get(&page) {
            return Ok(f(p));
        }
        self.cache.with(&PageIo(self), page, f)
    }

    /// Change metadata page `page`; `st` proves the exclusive lock is held.
    pub(super) fn page_mut<R>(
        &self,
        _st: &mut State,
        page: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        if !self.dirty.read().contains_key(&page) {
            let p = self.cache.with(&PageIo(self), page, |p| p.to_vec())?;
            self.dirty.write().insert(page, p);
        }
        let mut dirty = self.dirty.write();
        let p = dirty.get_mut(&page).expect("inserted above");
        Ok(f(p))
    }

    pub(super) fn read_entry(&self, idx: u64) -> Result<BatEntry> {
        let pos = self.geo.entry_pos(idx);
        let page = pos & !(PAGE_SIZE - 1);
        self.with_page(page, |p| BatEntry(le64(p, (pos - page) as usize)))
    }

    pub(super) fn write_entry(&self, st: &mut State, idx: u64, e: BatEntry) -> Result<()> {
        let pos = self.geo.entry_pos(idx);
        let page = pos & !(PAGE_SIZE - 1);
        let at = (pos - page) as usize;
        self.page_mut(st, page, |p| {
            p[at..at + 8].copy_from_slice(&e.0.to_le_bytes())
        })
    }

    fn invalid_state(&self, idx: u64, e: BatEntry) -> Error {
        Error::corrupt(format!(
            "VHDX BAT entry {idx} has invalid state {}",
            e.state()
        ))
        .at(self.geo.entry_pos(idx))
    }

    /// The host offset a BAT entry names, refused when it points into the header section or
    /// a metadata region.
    pub(super) fn checked_offset(&self, idx: u64, e: BatEntry, len: u64) -> Result<u64> {
        let host = e.offset();
        let bad = host < MIB
            || host.checked_add(len).is_none()
            || self.regions.bat.overlaps(host, len)
            || self.regions.metadata.overlaps(host, len)
            || self.log_region.overlaps(host, len);
        if bad {
            return Err(Error::corrupt(format!(
                "VHDX BAT entry {idx} points to {host:#x}, inside the header or metadata"
            ))
            .at(self.geo.entry_pos(idx)));
        }
        Ok(host)
    }

    /// A payload block: a freed one (not zeroed: `false`) or fresh space at the end of the
    /// file, which reads as zeros (`true`).
    pub(super) fn alloc(&self, st: &mut State) -> (u64, bool) {
        st.blocks_allocated += 1;
        if let Some(b) = st.free.pop() {
            return (b, false);
        }
        (self.alloc_fresh(st, self.geo.block_size), true)
    }

    /// Fresh space at the 1 MiB-aligned end of the file (sector bitmaps must start zeroed).
    pub(super) fn alloc_fresh(&self, st: &mut State, size: u64) -> u64 {
        let host = st.alloc_end;
        st.alloc_end += size;
        host
    }

    /// First write of the session: new file-write and data-write GUIDs, and a fresh log GUID
    /// so that this session's entries are told apart from any older ones.
    pub(super) fn begin_write(&self, st: &mut State) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("VHDX image is open read-only"));
        }
        if st.log_guid.is_some() {
            return Ok(());
        }
        if log::max_pages(self.log_region.length) < 8 {
            return Err(Error::unsupported(
                "VHDX image has no usable log; writing is not supported",
            ));
        }
        let (fw, dw, lg) = (Guid::random()?, Guid::random()?, Guid::random()?);
        st.headers.update(&self.file, |h| {
            h.file_write_guid = fw;
            h.data_write_guid = dw;
            h.log_guid = lg;
        })?;
        st.log_guid = Some(lg);
        st.log_pos = 0;
        st.log_seq = 1;
        self.writing.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Keep an entry's worth of pages in hand: log what is dirty before it no longer fits.
    fn make_room(&self, st: &mut State) -> Result<()> {
        if self.dirty.read().len() + 8 > log::max_pages(self.log_region.length) {
            self.flush_locked(st)?;
        }
        Ok(())
    }

    pub(super) fn flush_locked(&self, st: &mut State) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self.dirty.read().is_empty() {
            self.file.sync()?;
            let p = std::mem::take(&mut st.pending_free);
            st.free.extend(p);
            return Ok(());
        }
        let guid = st
            .log_guid
            .ok_or_else(|| Error::corrupt("VHDX pages dirty without a log"))?;
        if self.file.len()? < st.alloc_end {
            self.file.set_len(st.alloc_end)?;
        }
        // Data and earlier in-place page writes durable: the log may start afresh here.
        self.file.sync()?;
        let file_len = self.file.len()?;
        // A copy: lookups keep seeing the changed pages until they are written in place.
        // (Nothing changes them meanwhile: that takes `st`.)
        let dirty = self.dirty.read().clone();
        // On failure the changes stay dirty, so a retry logs them again.
        self.log_and_apply(st, guid, file_len, &dirty)?;
        self.dirty.write().clear();
        let p = std::mem::take(&mut st.pending_free);
        st.free.extend(p);
        Ok(())
    }

    /// Write `dirty` as log entries (as few as fit), each synced before its pages are written
    /// in place.
    fn log_and_apply(
        &self,
        st: &mut State,
        guid: Guid,
        file_len: u64,
        dirty: &BTreeMap<u64, Vec<u8>>,
    ) -> Result<()> {
        let pages: Vec<(u64, &[u8])> = dirty.iter().map(|(o, p)| (*o, p.as_slice())).collect();
        let per = log::max_pages(self.log_region.length);
        let chunks: Vec<_> = pages.chunks(per).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let bytes = log::build_entry(&NewEntry {
                guid,
                sequence: st.log_seq,
                tail: st.log_pos,
                flushed_file_offset: file_len,
                last_file_offset: file_len,
                pages: chunk,
            });
            self.write_ring(st.log_pos, &bytes)?;
            st.log_pos = (st.log_pos + bytes.len() as u64) % self.log_region.length;
            st.log_seq += 1;
            st.entries_written += 1;
            self.file.sync()?;
            for (off, p) in chunk.iter() {
                self.file.write_all_at(p, *off)?;
                // After the write: a load that raced it is not cached (see TableCache::get).
                self.cache.discard(*off);
            }
            if i + 1 < chunks.len() {
                self.file.sync()?;
            }
        }
        Ok(())
    }

    fn write_ring(&self, pos: u64, bytes: &[u8]) -> Result<()> {
        let l = self.log_region.length;
        let first = ((l - pos) as usize).min(bytes.len());
        self.file
            .write_all_at(&bytes[..first], self.log_region.offset + pos)?;
        if first < bytes.len() {
            self.file
                .write_all_at(&bytes[first..], self.log_region.offset)?;
        }
        Ok(())
    }

    fn details(&self, st: &State) -> serde_json::Map<String, serde_json::Value> {
        let h = st.headers.cur();
        let mut d = serde_json::Map::new();
        let m = &self.meta;
        d.insert("block_size".into(), m.block_size.into());
        d.insert("logical_sector_size".into(), m.logical_sector.into());
        d.insert("physical_sector_size".into(), m.physical_sector.into());
        d.insert(
            "subformat".into(),
            if m.leave_blocks_allocated {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
        );
        d.insert("has_parent".into(), m.has_parent.into());
        d.insert(
            "data_write_guid".into(),
            h.data_write_guid.to_braced().into(),
        );
        d.insert(
            "file_write_guid".into(),
            h.file_write_guid.to_braced().into(),
        );
        d.insert("page83".into(), m.page83.to_braced().into());
        d.insert("header_sequence".into(), h.sequence_number.into());
        d.insert("log_size".into(), self.log_region.length.into());
        d.insert("log".into(), self.log_state.into());
        d.insert("log_entries_replayed".into(), self.replayed_entries.into());
        if let Some(l) = m.parent_value("parent_linkage") {
            d.insert("parent_linkage".into(), l.into());
        }
        d
    }

    /// (block, offset in block, bytes to the block end or `len`).
    fn locate(&self, off: u64, len: u64) -> (u64, u64, u64) {
        let bs = self.geo.block_size;
        (off / bs, off % bs, len.min(bs - off % bs))
    }
}

/// Replay a log into the file (read-write open), then mark the log empty.
fn apply_replay(file: &HostFile, headers: &mut Headers, r: log::Replay) -> Result<()> {
    let (fw, dw) = (Guid::random()?, Guid::random()?);
    headers.update(file, |h| {
        h.file_write_guid = fw;
        h.data_write_guid = dw;
    })?;
    for op in &r.ops {
        match op {
            LogOp::Data { off, data } => file.write_all_at(data, *off)?,
            LogOp::Zero { off, len } => file.write_zeroes(*off, *len)?,
        }
    }
    if file.len()? < r.last_file_offset {
        file.set_len(r.last_file_offset)?;
    }
    file.sync()?;
    headers.update(file, |h| h.log_guid = Guid::ZERO)
}

impl BlockMap for VhdxMap {
    /// A differencing image names the data-write GUID its parent had when it was made
    /// (parent_linkage, or parent_linkage2 after a parent was re-linked); any other parent, or the
    /// same parent written since, would show the child wrong data.
    fn check_backing(&self, parent: &ImageInfo) -> Result<()> {
        let m = &self.meta;
        let Some(linkage) = m.parent_value("parent_linkage") else {
            return Ok(());
        };
        let Some(parent_guid) = parent
            .details
            .get("data_write_guid")
            .and_then(|v| v.as_str())
        else {
            return Ok(());
        };
        let matches = |g: Option<&str>| g.is_some_and(|g| g.eq_ignore_ascii_case(parent_guid));
        if matches(Some(linkage)) || matches(m.parent_value("parent_linkage2")) {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "differencing image was made against parent data {linkage}, but its parent now has \
             {parent_guid}: the parent changed since the child was created"
        )))
    }

    fn info(&self) -> ImageInfo {
        let st = self.st_lock();
        ImageInfo {
            format: "vhdx",
            virtual_size: self.size.load(Ordering::Acquire),
            cluster_size: self.geo.block_size,
            backing: self.meta.parent_path().map(|name| BackingRef {
                name,
                format: Some("vhdx".into()),
            }),
            details: self.details(&st),
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (block, inb, n) = self.locate(off, len);
        let idx = self.geo.payload_index(block);
        let e = self.read_entry(idx)?;
        match e.payload_state() {
            Payload::FullyPresent => {
                let host = self.checked_offset(idx, e, self.geo.block_size)?;
                Ok(Extent::Data {
                    host: host + inb,
                    len: n,
                })
            }
            Payload::PartiallyPresent if self.geo.has_parent => {
                let host = self.checked_offset(idx, e, self.geo.block_size)?;
                let bm = self.bitmap_block(block)?.ok_or_else(|| {
                    Error::corrupt(format!(
                        "VHDX block {block} is partially present without a sector bitmap"
                    ))
                    .at(self.geo.entry_pos(idx))
                })?;
                let (present, run) = self.bitmap_run(bm, block, inb, n)?;
                Ok(if present {
                    Extent::Data {
                        host: host + inb,
                        len: run,
                    }
                } else {
                    Extent::Backing { len: run }
                })
            }
            Payload::NotPresent | Payload::Undefined if self.geo.has_parent => {
                Ok(Extent::Backing { len: n })
            }
            Payload::NotPresent | Payload::Undefined | Payload::Zero | Payload::Unmapped => {
                Ok(Extent::Zero { len: n })
            }
            Payload::PartiallyPresent | Payload::Reserved(_) => Err(self.invalid_state(idx, e)),
        }
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        let (block, inb, n) = self.locate(off, len);
        let idx = self.geo.payload_index(block);
        let bs = self.geo.block_size;
        if self.writing.load(Ordering::SeqCst) {
            // A fully present block is written in place: no allocation, no lock.
            let e = self.read_entry(idx)?;
            if e.payload_state() == Payload::FullyPresent {
                return Ok(Extent::Data {
                    host: self.checked_offset(idx, e, bs)? + inb,
                    len: n,
                });
            }
        }
        let mut st = self.st_lock();
        self.begin_write(&mut st)?;
        self.make_room(&mut st)?;
        let e = self.read_entry(idx)?;
        let state = e.payload_state();
        let data = |host: u64| Extent::Data {
            host: host + inb,
            len: n,
        };
        match state {
            Payload::FullyPresent => return Ok(data(self.checked_offset(idx, e, bs)?)),
            Payload::PartiallyPresent if self.geo.has_parent => {
                let host = self.checked_offset(idx, e, bs)?;
                let bm = self.bitmap_block(block)?.ok_or_else(|| {
                    Error::corrupt("VHDX partially present block without a sector bitmap")
                        .at(self.geo.entry_pos(idx))
                })?;
                self.write_partial(&mut st, bm, block, host, inb, n, below)?;
                return Ok(data(host));
            }
            Payload::NotPresent | Payload::Undefined | Payload::Zero | Payload::Unmapped => {}
            Payload::PartiallyPresent | Payload::Reserved(_) => {
                return Err(self.invalid_state(idx, e))
            }
        }
        let from_parent =
            self.geo.has_parent && matches!(state, Payload::NotPresent | Payload::Undefined);
        if from_parent && !(inb == 0 && n == bs) {
            // New partially present block: only the written sectors come from this image.
            let bm = match self.bitmap_block(block)? {
                Some(b) => b,
                None => {
                    let b = self.alloc_fresh(&mut st, MIB);
                    let bidx = self.geo.bitmap_index(block / self.geo.chunk_ratio);
                    self.write_entry(&mut st, bidx, BatEntry::bitmap(b))?;
                    b
                }
            };
            let (host, _) = self.alloc(&mut st);
            self.clear_block_bits(&mut st, bm, block)?;
            let ne = BatEntry::payload(Payload::PartiallyPresent, host);
            self.write_entry(&mut st, idx, ne)?;
            self.write_partial(&mut st, bm, block, host, inb, n, below)?;
            return Ok(data(host));
        }
        // Fully present block whose unwritten rest reads as zeros.
        let reuse = e.offset() != 0 && self.checked_offset(idx, e, bs).is_ok();
        let (host, fresh) = if reuse {
            (e.offset(), false)
        } else {
            self.alloc(&mut st)
        };
        if !fresh {
            if self.meta.leave_blocks_allocated {
                self.file.write_zeroes(host, inb)?;
                self.file.write_zeroes(host + inb + n, bs - inb - n)?;
            } else {
                self.file.punch_hole(host, bs)?;
            }
        }
        let ne = BatEntry::payload(Payload::FullyPresent, host);
        self.write_entry(&mut st, idx, ne)?;
        Ok(data(host))
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        let bs = self.geo.block_size;
        if !off.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Ok(false);
        }
        let mut st = self.st_lock();
        self.begin_write(&mut st)?;
        for block in off / bs..(off + len) / bs {
            self.make_room(&mut st)?;
            let idx = self.geo.payload_index(block);
            let e = self.read_entry(idx)?;
            let host = e.offset();
            let keep = host != 0 && self.checked_offset(idx, e, bs).is_ok();
            let free = keep && unmap && !self.meta.leave_blocks_allocated;
            let new = if free {
                st.pending_free.push(host);
                BatEntry::payload(Payload::Zero, 0)
            } else if keep {
                BatEntry::payload(Payload::Zero, host)
            } else {
                BatEntry::payload(Payload::Zero, 0)
            };
            if new != e {
                self.write_entry(&mut st, idx, new)?;
            }
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        let mut st = self.st_lock();
        self.flush_locked(&mut st)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_to(new_size)
    }

    fn close(&self) -> Result<()> {
        let mut st = self.st_lock();
        self.flush_locked(&mut st)?;
        if !self.read_only && st.log_guid.is_some() {
            self.file.sync()?;
            st.headers.update(&self.file, |h| h.log_guid = Guid::ZERO)?;
            st.log_guid = None;
            self.writing.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    fn stats(&self) -> FormatStats {
        let st = self.st_lock();
        FormatStats {
            cache: self.cache.stats(),
            clusters_allocated: st.blocks_allocated,
            log_entries_written: st.entries_written,
            log_entries_replayed: self.replayed_entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{CreateOpts, NoBelow};
    use crate::host::FaultFile;
    use std::path::Path;
    use std::sync::Arc;

    fn new_image(size: u64) -> Arc<FaultFile> {
        let fault = FaultFile::new(vec![]);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let opts = CreateOpts {
            size,
            options: [("block_size".to_string(), "1M".to_string())].into(),
            ..CreateOpts::default()
        };
        super::super::create::create(&f, &opts).unwrap();
        fault
    }

    fn open(fault: &Arc<FaultFile>, read_only: bool) -> VhdxMap {
        VhdxMap::open(
            fault.host_file(Path::new("t.vhdx"), !read_only),
            read_only,
            1 << 20,
        )
        .unwrap()
    }

    fn write(m: &VhdxMap, f: &HostFile, off: u64, data: &[u8]) {
        let Extent::Data { host, len } = m.map_write(off, data.len() as u64, &NoBelow).unwrap()
        else {
            panic!("map_write gave no data extent")
        };
        assert_eq!(len, data.len() as u64);
        f.write_all_at(data, host).unwrap();
    }

    #[test]
    fn one_log_entry_per_flush_for_many_pages() {
        let fault = new_image(2048 * MIB);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let m = open(&fault, false);
        // Blocks 0, 600 and 1500 live in three different BAT pages.
        for b in [0u64, 600, 1500] {
            write(&m, &f, b * MIB + 10, &[7; 100]);
        }
        assert_eq!(m.dirty.read().len(), 3);
        m.flush().unwrap();
        assert_eq!(m.stats().log_entries_written, 1);
        assert!(m.dirty.read().is_empty());
        m.close().unwrap();
        let m = open(&fault, true);
        for b in [0u64, 600, 1500] {
            assert!(matches!(
                m.map_read(b * MIB + 10, 100).unwrap(),
                Extent::Data { .. }
            ));
        }
        assert_eq!(m.map_read(MIB, 10).unwrap(), Extent::Zero { len: 10 });
    }

    #[test]
    fn read_only_open_replays_in_memory_without_writing() {
        let fault = new_image(8 * MIB);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let m = open(&fault, false);
        write(&m, &f, 3 * MIB, &[5; 4096]);
        m.flush().unwrap();
        let dirty = fault.durable();
        std::mem::forget(m);
        let ro = FaultFile::new(dirty.clone());
        let m = VhdxMap::open(ro.host_file(Path::new("t.vhdx"), false), true, 1 << 20).unwrap();
        assert!(m.log_state.starts_with("dirty"));
        let Extent::Data { host, .. } = m.map_read(3 * MIB, 4096).unwrap() else {
            panic!("replayed BAT entry not seen")
        };
        let mut buf = vec![0u8; 4096];
        ro.host_file(Path::new("t.vhdx"), false)
            .read_exact_at(&mut buf, host)
            .unwrap();
        assert_eq!(buf, vec![5; 4096]);
        assert!(m.map_write(0, 1, &NoBelow).is_err());
        m.close().unwrap();
        assert_eq!(ro.write_count(), 0);
        assert_eq!(ro.contents(), dirty);
    }

    #[test]
    fn unmapped_block_is_reused_only_after_flush() {
        let fault = new_image(4 * MIB);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let m = open(&fault, false);
        write(&m, &f, 0, &[1; 512]);
        m.flush().unwrap();
        let Extent::Data { host: first, .. } = m.map_read(0, 1).unwrap() else {
            panic!()
        };
        assert!(m.write_zeroes(0, MIB, true, &NoBelow).unwrap());
        write(&m, &f, MIB, &[2; 512]);
        let Extent::Data { host: second, .. } = m.map_read(MIB, 1).unwrap() else {
            panic!()
        };
        assert_ne!(
            second, first,
            "freed block reused before its BAT change was durable"
        );
        m.flush().unwrap();
        write(&m, &f, 2 * MIB + 512, &[3; 512]);
        let Extent::Data { host: third, .. } = m.map_read(2 * MIB, 1).unwrap() else {
            panic!()
        };
        assert_eq!(third, first, "freed block not reused after the flush");
        // The reused block reads zeros around the new data.
        let mut head = vec![9u8; 512];
        f.read_zerofill(&mut head, third).unwrap();
        assert_eq!(head, vec![0; 512]);
    }

    #[test]
    fn failed_flush_keeps_changes_for_a_retry() {
        let fault = new_image(4 * MIB);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let m = open(&fault, false);
        write(&m, &f, MIB + 5, &[4; 700]);
        fault.fail_syncs(true);
        assert!(m.flush().is_err());
        assert!(matches!(
            m.map_read(MIB + 5, 700).unwrap(),
            Extent::Data { .. }
        ));
        fault.fail_syncs(false);
        m.flush().unwrap();
        m.close().unwrap();
        let m = open(&fault, true);
        let Extent::Data { host, .. } = m.map_read(MIB + 5, 700).unwrap() else {
            panic!("BAT change lost after a failed flush")
        };
        let mut buf = vec![0u8; 700];
        f.read_exact_at(&mut buf, host).unwrap();
        assert_eq!(buf, vec![4; 700]);
    }

    #[test]
    fn sector_bitmap_never_lands_in_a_freed_block() {
        let fault = FaultFile::new(vec![]);
        let f = fault.host_file(Path::new("t.vhdx"), true);
        let mut details = serde_json::Map::new();
        details.insert("data_write_guid".into(), Guid([1; 16]).to_braced().into());
        let opts = CreateOpts {
            options: [("block_size".to_string(), "1M".to_string())].into(),
            backing: Some(crate::format::BackingRef {
                name: "p.vhdx".into(),
                format: Some("vhdx".into()),
            }),
            backing_info: Some(ImageInfo {
                format: "vhdx",
                virtual_size: 4 * MIB,
                cluster_size: MIB,
                backing: None,
                details,
            }),
            ..CreateOpts::default()
        };
        super::super::create::create(&f, &opts).unwrap();
        let m = open(&fault, false);
        write(&m, &f, 0, &vec![0xaa; MIB as usize]);
        m.flush().unwrap();
        assert!(m.write_zeroes(0, MIB, true, &NoBelow).unwrap());
        m.flush().unwrap();
        // Block 1 gets the freed block; its chunk's sector bitmap must be fresh zeroed space.
        write(&m, &f, MIB + 4096, &[1; 512]);
        assert_eq!(
            m.map_read(MIB, 4096).unwrap(),
            Extent::Backing { len: 4096 }
        );
        assert!(matches!(
            m.map_read(MIB + 4096, 512).unwrap(),
            Extent::Data { len: 512, .. }
        ));
        assert_eq!(
            m.map_read(MIB + 4608, 100).unwrap(),
            Extent::Backing { len: 100 }
        );
    }
}
