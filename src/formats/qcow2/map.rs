//! The block map: L1 in memory, L2 tables through the TableCache, guest offset -> extent.
//!
//! ```text
//!   guest off -> cluster = off >> cluster_bits
//!             -> l1_index = cluster / l2_entries, l2_index = cluster % l2_entries
//!   L1 and L2 entries: see entry.rs
//! ```

use super::compressed;
pub use super::entry::{
    entry_at, set_entry_at, L2Entry, Sc, Subclusters, L1E_OFFSET_MASK, SUBCLUSTERS,
};
use super::header::{Compression, Header};
use super::refcount::Refcounts;
use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::formats::be64;
use crate::host::HostFile;
use parking_lot::{Mutex, MutexGuard, RwLock};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

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
    Compressed(L2Entry),
}

/// The L1 table in memory. Readers copy one entry under a short shared lock.
pub struct L1 {
    pub entries: Vec<u64>,
    pub offset: u64,
    /// Range of L1 entries changed since the last write-back.
    pub dirty: Option<(usize, usize)>,
}

impl L1 {
    pub fn set(&mut self, idx: usize, v: u64) {
        self.entries[idx] = v;
        self.dirty = Some(match self.dirty {
            None => (idx, idx + 1),
            Some((a, b)) => (a.min(idx), b.max(idx + 1)),
        });
    }
}

/// Allocation state: the exclusive lock that writers which allocate (and flush) take. Readers
/// never take it.
pub struct Alloc {
    pub rc: Option<Refcounts>,
    pub incompat: u64,
    pub autoclear: u64,
    pub prepared: bool,
    /// The bitmaps extension is still in the header (dropped on the first write).
    pub bitmaps: bool,
}

/// Loads and stores L2 tables. Before a table is written: data durable, refcounts durable.
/// Readers use one without refcounts: the cache never stores on a reader's behalf.
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
            let Some(rc) = &self.rc else {
                return Err(Error::corrupt("qcow2 L2 table stored without its refcounts").at(off));
            };
            // Every cluster this table may point at lies inside the file before it is written.
            let end = rc.borrow().next_free << rc.borrow().cluster_bits();
            if self.file.len()? < end {
                self.file.set_len(end)?;
            }
            if self.external {
                self.data.sync()?;
            }
            self.file.sync()?;
            rc.borrow_mut().flush_durable()?;
            self.deps_done.set(true);
        }
        self.file.write_all_at(buf, off)
    }
}

/// The read side shared by the active image and snapshot views.
///
/// Locks: `l1` (shared for a lookup, exclusive for a moment to change an entry), the L2
/// `TableCache` (its own short lock; loads and write-backs run outside it), and `alloc` (writers
/// that allocate, and flush). A lookup takes `l1` and the cache, never `alloc`, and waits on
/// no I/O except loading a missing table with no lock held.
pub struct Mapper {
    pub file: HostFile,
    pub data: HostFile,
    pub geo: Geo,
    pub l1: RwLock<L1>,
    pub l2: TableCache,
    pub alloc: Mutex<Alloc>,
    /// `Alloc::prepared`, readable without the lock (in-place writes need no allocation).
    pub prepared: AtomicBool,
    /// End of the clusters handed out so far (the file may be shorter until the next flush).
    pub frontier: Arc<AtomicU64>,
    /// Last decompressed cluster, keyed by its L2 entry.
    zcache: Mutex<Option<(L2Entry, Arc<Vec<u8>>)>>,
}

impl Mapper {
    pub fn new(
        file: HostFile,
        data: HostFile,
        geo: Geo,
        l1: L1,
        l2: TableCache,
        alloc: Alloc,
    ) -> Mapper {
        let frontier = match &alloc.rc {
            Some(rc) => rc.frontier.clone(),
            None => Arc::new(AtomicU64::new(0)),
        };
        Mapper {
            file,
            data,
            geo,
            l1: RwLock::new(l1),
            l2,
            prepared: AtomicBool::new(alloc.prepared),
            alloc: Mutex::new(alloc),
            frontier,
            zcache: Mutex::new(None),
        }
    }

    pub fn lock_alloc(&self) -> MutexGuard<'_, Alloc> {
        self.alloc.lock()
    }

    /// The io a lookup passes to the cache (loads only).
    pub fn read_io(&self) -> L2Io<'_> {
        L2Io {
            file: &self.file,
            data: &self.data,
            external: self.geo.external,
            rc: None,
            deps_done: Cell::new(false),
        }
    }

    /// The io a writer passes to the cache: it can write tables back, refcounts first.
    pub fn write_io<'a>(&'a self, a: &'a mut Alloc) -> L2Io<'a> {
        L2Io {
            file: &self.file,
            data: &self.data,
            external: self.geo.external,
            rc: a.rc.as_mut().map(RefCell::new),
            deps_done: Cell::new(false),
        }
    }

    pub fn l2_entry(&self, io: &L2Io, l2_off: u64, idx: u64) -> Result<(L2Entry, Subclusters)> {
        let ext = self.geo.ext_l2;
        self.l2.with(io, l2_off, |t| entry_at(t, idx, ext))
    }

    pub fn set_l2_entry(
        &self,
        io: &L2Io,
        l2_off: u64,
        idx: u64,
        e: L2Entry,
        b: Subclusters,
    ) -> Result<()> {
        let ext = self.geo.ext_l2;
        self.l2
            .with_mut(io, l2_off, |t| set_entry_at(t, idx, ext, e, b))
    }

    /// The raw L1 entry for `l1_index` (0 past the table).
    pub fn l1_entry(&self, l1_index: u64) -> u64 {
        self.l1
            .read()
            .entries
            .get(l1_index as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The L2 table offset for `l1_index` (0 when unallocated), validated.
    pub fn l2_offset(&self, l1_index: u64) -> Result<u64> {
        let off = self.l1_entry(l1_index) & L1E_OFFSET_MASK;
        if !off.is_multiple_of(self.geo.cs) {
            let at = self.l1.read().offset + l1_index * 8;
            return Err(
                Error::corrupt(format!("L2 table offset {off:#x} is not cluster aligned")).at(at),
            );
        }
        Ok(off)
    }

    /// What the guest bytes at `off` are, and how many bytes of the same kind follow in this
    /// cluster (or L2 range when the whole table is missing).
    pub fn piece(&self, io: &L2Io, off: u64) -> Result<(Piece, u64)> {
        let g = &self.geo;
        let cluster = off >> g.cluster_bits;
        let in_c = off & (g.cs - 1);
        let l1_index = cluster / g.l2_entries;
        let l2_index = cluster % g.l2_entries;
        let l2_off = self.l2_offset(l1_index)?;
        if l2_off == 0 {
            return Ok((Piece::Backing, (g.l2_entries - l2_index) * g.cs - in_c));
        }
        let (e, b) = self.l2_entry(io, l2_off, l2_index)?;
        let at = l2_off + l2_index * g.entry_bytes() as u64;
        self.classify(e, b, in_c).map_err(|err| err.at(at))
    }

    pub fn classify(&self, e: L2Entry, bitmap: Subclusters, in_c: u64) -> Result<(Piece, u64)> {
        let g = &self.geo;
        let rest = g.cs - in_c;
        if e.compressed() {
            if g.external {
                return Err(Error::corrupt(
                    "compressed cluster in an image with a data file",
                ));
            }
            return Ok((Piece::Compressed(e), rest));
        }
        let host = e.host();
        if host & (g.cs - 1) != 0 {
            return Err(Error::corrupt(format!(
                "L2 entry {:#x}: host offset {host:#x} is not cluster aligned",
                e.0
            )));
        }
        let has_host = e.has_host(g.external);
        if !g.ext_l2 {
            if g.version >= 3 && e.zero_flag() {
                return Ok((Piece::Zero, rest));
            }
            if !has_host {
                if e.copied() {
                    return Err(Error::corrupt(format!(
                        "L2 entry {:#x} points at the image header",
                        e.0
                    )));
                }
                return Ok((Piece::Backing, rest));
            }
            return Ok((Piece::Data(host + in_c), rest));
        }
        if bitmap.conflicting() {
            return Err(Error::corrupt(format!(
                "extended L2 bitmap {:#x} marks subclusters both allocated and zero",
                bitmap.0
            )));
        }
        let sc = in_c / g.sc_size;
        let state = bitmap.state(sc);
        let mut end = sc + 1;
        while end < SUBCLUSTERS && bitmap.state(end) == state {
            end += 1;
        }
        let run = end * g.sc_size - in_c;
        Ok(match state {
            Sc::Allocated if !has_host => {
                return Err(Error::corrupt(format!(
                    "extended L2 entry {:#x} has allocated subclusters but no host cluster",
                    e.0
                )))
            }
            Sc::Allocated => (Piece::Data(host + in_c), run),
            Sc::Zero => (Piece::Zero, run),
            Sc::Unallocated => (Piece::Backing, run),
        })
    }

    /// Coalesce pieces starting at `off` into one run of at most `len` bytes.
    pub fn run(&self, off: u64, len: u64) -> Result<(Piece, u64)> {
        let io = self.read_io();
        let (p, n) = self.piece(&io, off)?;
        let mut n = n.min(len);
        // Bound the work of one lookup.
        let limit = len.min(64 * self.geo.cs.max(1 << 20));
        while n < limit {
            let (q, k) = self.piece(&io, off + n)?;
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
            let (p, _) = self.piece(&self.read_io(), pos)?;
            let Piece::Compressed(e) = p else {
                return Err(Error::corrupt("cluster changed while being read").at(pos));
            };
            let cached = self
                .zcache
                .lock()
                .as_ref()
                .filter(|(k, _)| *k == e)
                .map(|(_, d)| d.clone());
            let data = match cached {
                Some(d) => d,
                None => {
                    // Read and inflate with no lock held.
                    let mut out = vec![0u8; cs as usize];
                    self.decompress(e, &mut out)?;
                    let out = Arc::new(out);
                    *self.zcache.lock() = Some((e, out.clone()));
                    out
                }
            };
            buf[done..done + n].copy_from_slice(&data[in_c..in_c + n]);
            done += n;
        }
        Ok(())
    }

    pub fn decompress(&self, entry: L2Entry, out: &mut [u8]) -> Result<()> {
        let r = entry.compressed_ref(self.geo.cluster_bits);
        compressed::read_cluster(&self.file, r, self.geo.compression, out)
    }

    pub fn forget_compressed(&self) {
        *self.zcache.lock() = None;
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
