//! The block map: L1 in memory, L2 tables through the TableCache, guest offset -> extent.
//!
//! ```text
//!   guest off -> cluster = off >> cluster_bits
//!             -> l1_index = cluster / l2_entries, l2_index = cluster % l2_entries
//!   L1 entry: 63 copied | 55..9 L2 table offset
//!   L2 entry: 63 copied | 62 compressed | 55..9 host cluster | 0 zero (v3, not extended)
//!   extended L2: [entry u64][bitmap u64: 31..0 allocated, 63..32 reads-as-zero per subcluster]
//! ```

use super::compressed::{self, CompressedRef};
use super::header::{Compression, Header};
use super::refcount::Refcounts;
use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::formats::be64;
use crate::host::HostFile;
use std::cell::{Cell, RefCell};
use std::sync::{Mutex, MutexGuard};

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const SUBCLUSTERS: u64 = 32;
pub const ALL_ZERO_BITS: u64 = 0xffff_ffff << 32;

/// Fixed facts about an open image.
#[derive(Debug, Clone)]
pub struct Geo {
    pub cluster_bits: u32,
    pub cs: u64,
    pub l2_entries: u64,
    pub ext_l2: bool,
    pub sc_size: u64,
    pub version: u32,
    pub compression: Compression,
    pub external: bool,
    pub data_raw: bool,
    pub has_backing: bool,
}

impl Geo {
    pub fn new(h: &Header) -> Geo {
        let cs = h.cluster_size();
        Geo {
            cluster_bits: h.cluster_bits,
            cs,
            l2_entries: h.l2_entries(),
            ext_l2: h.extended_l2(),
            sc_size: if h.extended_l2() {
                cs / SUBCLUSTERS
            } else {
                cs
            },
            version: h.version,
            compression: h.compression,
            external: h.has_data_file(),
            data_raw: h.has_data_file()
                && h.autoclear & super::header::AUTOCLEAR_DATA_FILE_RAW != 0,
            has_backing: h.backing_file.is_some(),
        }
    }
    pub fn entry_bytes(&self) -> usize {
        if self.ext_l2 {
            16
        } else {
            8
        }
    }
}

/// What one run of guest bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Data(u64),
    Zero,
    Backing,
    /// A compressed cluster (its L2 entry).
    Compressed(u64),
}

/// Mutable metadata, under one lock held only while computing extents or allocating.
pub struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    /// Range of L1 entries changed since the last write-back.
    pub l1_dirty: Option<(usize, usize)>,
    pub l2: TableCache,
    pub rc: Option<Refcounts>,
    pub incompat: u64,
    pub autoclear: u64,
    pub prepared: bool,
    /// The bitmaps extension is still in the header (dropped on the first write).
    pub bitmaps: bool,
}

/// Loads and stores L2 tables. Before a table is written: data durable, refcounts durable.
pub struct L2Io<'a> {
    pub file: &'a HostFile,
    pub data: &'a HostFile,
    pub external: bool,
    pub rc: Option<RefCell<&'a mut Refcounts>>,
    pub deps_done: Cell<bool>,
}

impl TableIo for L2Io<'_> {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        if !self.deps_done.get() {
            if let Some(rc) = &self.rc {
                // Every cluster this table may point at lies inside the file before it is written.
                let end = rc.borrow().next_free << rc.borrow().cluster_bits();
                if self.file.len()? < end {
                    self.file.set_len(end)?;
                }
            }
            if self.external {
                self.data.sync()?;
            }
            self.file.sync()?;
            if let Some(rc) = &self.rc {
                rc.borrow_mut().flush_durable()?;
            }
            self.deps_done.set(true);
        }
        self.file.write_all_at(buf, off)
    }
}

impl Meta {
    pub fn set_l1(&mut self, idx: usize, v: u64) {
        self.l1[idx] = v;
        self.l1_dirty = Some(match self.l1_dirty {
            None => (idx, idx + 1),
            Some((a, b)) => (a.min(idx), b.max(idx + 1)),
        });
    }

    /// The L2 cache and an io object borrowing the refcounts (disjoint borrows of `self`).
    pub fn split<'a>(
        &'a mut self,
        file: &'a HostFile,
        data: &'a HostFile,
        external: bool,
    ) -> (&'a TableCache, L2Io<'a>) {
        let io = L2Io {
            file,
            data,
            external,
            rc: self.rc.as_mut().map(RefCell::new),
            deps_done: Cell::new(false),
        };
        (&self.l2, io)
    }
}

/// Read an L2 entry (and its subcluster bitmap) from a table buffer.
pub fn entry_at(t: &[u8], idx: u64, ext: bool) -> (u64, u64) {
    let i = idx as usize * if ext { 16 } else { 8 };
    let e = be64(t, i);
    let b = if ext { be64(t, i + 8) } else { 0 };
    (e, b)
}

pub fn set_entry_at(t: &mut [u8], idx: u64, ext: bool, e: u64, b: u64) {
    let i = idx as usize * if ext { 16 } else { 8 };
    t[i..i + 8].copy_from_slice(&e.to_be_bytes());
    if ext {
        t[i + 8..i + 16].copy_from_slice(&b.to_be_bytes());
    }
}

/// The state of subcluster `sc` in an extended entry: 'A'llocated, 'Z'ero or 'U'nallocated.
pub fn sc_state(bitmap: u64, sc: u64) -> u8 {
    if bitmap >> sc & 1 != 0 {
        b'A'
    } else if bitmap >> (32 + sc) & 1 != 0 {
        b'Z'
    } else {
        b'U'
    }
}

/// The read side shared by the active image and snapshot views.
pub struct Mapper {
    pub file: HostFile,
    pub data: HostFile,
    pub geo: Geo,
    pub meta: Mutex<Meta>,
    /// Last decompressed cluster, keyed by its L2 entry.
    zcache: Mutex<Option<(u64, Vec<u8>)>>,
}

impl Mapper {
    pub fn new(file: HostFile, data: HostFile, geo: Geo, meta: Meta) -> Mapper {
        Mapper {
            file,
            data,
            geo,
            meta: Mutex::new(meta),
            zcache: Mutex::new(None),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn l2_entry(&self, m: &mut Meta, l2_off: u64, idx: u64) -> Result<(u64, u64)> {
        let ext = self.geo.ext_l2;
        let (cache, io) = m.split(&self.file, &self.data, self.geo.external);
        cache.with(&io, l2_off, |t| entry_at(t, idx, ext))
    }

    pub fn set_l2_entry(&self, m: &mut Meta, l2_off: u64, idx: u64, e: u64, b: u64) -> Result<()> {
        let ext = self.geo.ext_l2;
        let (cache, io) = m.split(&self.file, &self.data, self.geo.external);
        cache.with_mut(&io, l2_off, |t| set_entry_at(t, idx, ext, e, b))
    }

    /// The L2 table offset for `l1_index` (0 when unallocated), validated.
    pub fn l2_offset(&self, m: &Meta, l1_index: u64) -> Result<u64> {
        let Some(&e) = m.l1.get(l1_index as usize) else {
            return Ok(0);
        };
        let off = e & L1E_OFFSET_MASK;
        if !off.is_multiple_of(self.geo.cs) {
            return Err(
                Error::corrupt(format!("L2 table offset {off:#x} is not cluster aligned"))
                    .at(m.l1_offset + l1_index * 8),
            );
        }
        Ok(off)
    }

    /// What the guest bytes at `off` are, and how many bytes of the same kind follow in this
    /// cluster (or L2 range when the whole table is missing).
    pub fn piece(&self, m: &mut Meta, off: u64) -> Result<(Piece, u64)> {
        let g = &self.geo;
        let cluster = off >> g.cluster_bits;
        let in_c = off & (g.cs - 1);
        let l1_index = cluster / g.l2_entries;
        let l2_index = cluster % g.l2_entries;
        let l2_off = self.l2_offset(m, l1_index)?;
        if l2_off == 0 {
            return Ok((Piece::Backing, (g.l2_entries - l2_index) * g.cs - in_c));
        }
        let (e, b) = self.l2_entry(m, l2_off, l2_index)?;
        let at = l2_off + l2_index * g.entry_bytes() as u64;
        self.classify(e, b, in_c).map_err(|err| err.at(at))
    }

    pub fn classify(&self, e: u64, bitmap: u64, in_c: u64) -> Result<(Piece, u64)> {
        let g = &self.geo;
        let rest = g.cs - in_c;
        if e & OFLAG_COMPRESSED != 0 {
            if g.external {
                return Err(Error::corrupt(
                    "compressed cluster in an image with a data file",
                ));
            }
            return Ok((Piece::Compressed(e), rest));
        }
        let host = e & L2E_OFFSET_MASK;
        if host & (g.cs - 1) != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {e:#x}: host offset {host:#x} is not cluster aligned"
            )));
        }
        let has_host = host != 0 || (g.external && e & OFLAG_COPIED != 0);
        if !g.ext_l2 {
            if g.version >= 3 && e & OFLAG_ZERO != 0 {
                return Ok((Piece::Zero, rest));
            }
            if !has_host {
                if e & OFLAG_COPIED != 0 {
                    return Err(Error::corrupt(format!(
                        "L2 entry {e:#x} points at the image header"
                    )));
                }
                return Ok((Piece::Backing, rest));
            }
            return Ok((Piece::Data(host + in_c), rest));
        }
        if bitmap & (bitmap >> 32) & 0xffff_ffff != 0 {
            return Err(Error::corrupt(format!(
                "extended L2 bitmap {bitmap:#x} marks subclusters both allocated and zero"
            )));
        }
        let sc = in_c / g.sc_size;
        let state = sc_state(bitmap, sc);
        let mut end = sc + 1;
        while end < SUBCLUSTERS && sc_state(bitmap, end) == state {
            end += 1;
        }
        let run = end * g.sc_size - in_c;
        Ok(match state {
            b'A' if !has_host => {
                return Err(Error::corrupt(format!(
                    "extended L2 entry {e:#x} has allocated subclusters but no host cluster"
                )))
            }
            b'A' => (Piece::Data(host + in_c), run),
            b'Z' => (Piece::Zero, run),
            _ => (Piece::Backing, run),
        })
    }

    /// Coalesce pieces starting at `off` into one run of at most `len` bytes.
    pub fn run(&self, off: u64, len: u64) -> Result<(Piece, u64)> {
        let mut m = self.lock();
        let (p, n) = self.piece(&mut m, off)?;
        let mut n = n.min(len);
        // Bound the work done under the lock.
        let limit = len.min(64 * self.geo.cs.max(1 << 20));
        while n < limit {
            let (q, k) = self.piece(&mut m, off + n)?;
            let joins = match (p, q) {
                (Piece::Data(h), Piece::Data(h2)) => h2 == h + n,
                (Piece::Compressed(_), Piece::Compressed(_)) => true,
                (a, b) => a == b,
            };
            if !joins {
                break;
            }
            n += k.min(limit - n);
        }
        Ok((p, n))
    }

    /// Serve compressed clusters for `[off, off+buf.len())`.
    pub fn read_compressed(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.geo.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let in_c = (pos & (cs - 1)) as usize;
            let n = (cs as usize - in_c).min(buf.len() - done);
            let (p, _) = {
                let mut m = self.lock();
                self.piece(&mut m, pos)?
            };
            let Piece::Compressed(e) = p else {
                return Err(Error::corrupt("cluster changed while being read").at(pos));
            };
            let mut z = self.zcache.lock().unwrap_or_else(|p| p.into_inner());
            if z.as_ref().map(|(k, _)| *k) != Some(e) {
                let mut out = vec![0u8; cs as usize];
                self.decompress(e, &mut out)?;
                *z = Some((e, out));
            }
            if let Some((_, data)) = z.as_ref() {
                buf[done..done + n].copy_from_slice(&data[in_c..in_c + n]);
            }
            done += n;
        }
        Ok(())
    }

    pub fn decompress(&self, entry: u64, out: &mut [u8]) -> Result<()> {
        let r = CompressedRef::decode(entry, self.geo.cluster_bits);
        compressed::read_cluster(&self.file, r, self.geo.compression, out)
    }

    pub fn forget_compressed(&self) {
        *self.zcache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Read and validate an L1 table of `n` entries at `off`.
pub fn read_l1(file: &HostFile, off: u64, n: u32, cs: u64) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; n as usize * 8];
    if n > 0 {
        file.read_exact_at(&mut raw, off)?;
    }
    let file_len = file.len()?;
    let mut l1 = Vec::with_capacity(n as usize);
    for (i, c) in raw.chunks_exact(8).enumerate() {
        let e = be64(c, 0);
        let t = e & L1E_OFFSET_MASK;
        if t != 0 && (!t.is_multiple_of(cs) || t.saturating_add(cs) > file_len) {
            return Err(Error::corrupt(format!(
                "L1 entry {i} points at {t:#x}, outside the image or not cluster aligned"
            ))
            .at(off + i as u64 * 8));
        }
        l1.push(e);
    }
    Ok(l1)
}
