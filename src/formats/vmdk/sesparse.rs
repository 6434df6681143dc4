//! ESXi space-efficient sparse extents (`SESPARSE`, the deltas of `seSparse` snapshots, ESXi
//! 6.5+). Not documented by VMware; the layout below is what QEMU's `block/vmdk.c` reads (its
//! checks are as strict as QEMU's). QEMU opens them read-only ("No write support for seSparse
//! images"), and so does imgfs: the journal, free bitmap and back map a writer must keep are
//! unknown.
//!
//! ```text
//!  sector 0: const header (u64 LE each)
//!    magic 0xcafebabe | version 0x2_0000_0001 | capacity | grain size 8 | GT size 64 | flags 0 |
//!    4 reserved (0) | then (offset, size) in sectors of: volatile header, journal header, journal,
//!    grain directory, grain tables, free bitmap, back map, grains | 304 bytes of zero padding
//!  volatile header: magic 0xcafecafe | free GT number | next txn seq | replay journal (must be 0)
//!  GD: u64 entries         0 = no table | 0x1000_0000_xxxx_xxxx = grain table number xxxx_xxxx
//!  GT n at grain tables + n * 64 sectors: 4096 u64 entries (one table maps 16 MiB of 4 KiB grains)
//!    top nibble 0: unallocated (the parent; the rest must be 0)   1: unmapped, 2: zero -> zeros
//!    3: allocated, grain number = bits 48..59 | bits 0..47 << 12, at grains + number * 8 sectors
//! ```
//!
//! (dissect.hypervisor calls type 1 "fallthrough"; QEMU reads it as zeros and imgfs matches QEMU.)

use super::sparse::{Entry, MAX_GD_ENTRIES, SECTOR};
use crate::cache::{CacheStats, TableCache, TableIo};
use crate::error::{Error, Result};
use crate::format::Extent;
use crate::formats::le64;
use crate::host::HostFile;

pub const CONST_MAGIC: u64 = 0xcafe_babe;
pub const VOLATILE_MAGIC: u64 = 0xcafe_cafe;
pub const VERSION: u64 = 0x0000_0002_0000_0001;
/// Grain size in sectors (4 KiB) and grain table size in sectors (32 KiB): the only ones QEMU
/// accepts.
pub const GRAIN_SECTORS: u64 = 8;
pub const GT_SECTORS: u64 = 64;
pub const GT_ENTRIES: u64 = GT_SECTORS * SECTOR / 8;
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// Guest bytes one grain table maps (16 MiB).
const GT_SPAN: u64 = GRAIN * GT_ENTRIES;

pub const GDE_TABLE: u64 = 0x1000_0000_0000_0000;
pub const GTE_UNMAPPED: u64 = 0x1000_0000_0000_0000;
pub const GTE_ZERO: u64 = 0x2000_0000_0000_0000;
pub const GTE_ALLOCATED: u64 = 0x3000_0000_0000_0000;

/// The placing fields of the const header (offsets and sizes in sectors).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SeHeader {
    pub capacity: u64,
    pub volatile_offset: u64,
    pub gd_offset: u64,
    pub gd_size: u64,
    pub gt_offset: u64,
    pub grains_offset: u64,
}

impl SeHeader {
    /// Parse and check the 512-byte const header as QEMU does (magic, version, grain and
    /// table sizes, flags, reserved words and padding), then bound it.
    pub fn parse(b: &[u8]) -> Result<SeHeader> {
        if b.len() < 512 || le64(b, 0) != CONST_MAGIC {
            return Err(Error::corrupt(
                "not an seSparse extent (no const header magic 0xcafebabe)",
            ));
        }
        let field = |i: usize| le64(b, i * 8);
        let unsupported = |what: String| Err(Error::unsupported(format!("seSparse {what}")));
        if field(1) != VERSION {
            return unsupported(format!("version {:#x}", field(1)));
        }
        if field(3) != GRAIN_SECTORS {
            return unsupported(format!("grain size {} sectors (only 8)", field(3)));
        }
        if field(4) != GT_SECTORS {
            return unsupported(format!("grain table size {} sectors (only 64)", field(4)));
        }
        if field(5) != 0 {
            return unsupported(format!("flags {:#x}", field(5)));
        }
        if (6..10).any(|i| field(i) != 0) || b[208..512].iter().any(|&x| x != 0) {
            return unsupported("const header with non-zero reserved fields or padding".into());
        }
        let h = SeHeader {
            capacity: field(2),
            volatile_offset: field(10),
            gd_offset: field(16),
            gd_size: field(17),
            gt_offset: field(18),
            grains_offset: field(24),
        };
        if h.capacity > super::MAX_SECTORS {
            return Err(Error::corrupt("seSparse capacity over 64 TiB"));
        }
        let entries = h.gd_size.checked_mul(SECTOR / 8);
        if entries.is_none_or(|n| n < h.gd_entries()) {
            return Err(Error::corrupt(format!(
                "seSparse grain directory of {} sectors cannot map {} sectors",
                h.gd_size, h.capacity
            )));
        }
        Ok(h)
    }

    /// Directory entries the capacity needs (the directory may be larger).
    pub fn gd_entries(&self) -> u64 {
        (self.capacity * SECTOR).div_ceil(GT_SPAN)
    }
}

/// Check the volatile header (512 bytes at `volatile_offset`): magic, a journal that needs no
/// replay, zero padding.
pub fn check_volatile(b: &[u8]) -> Result<()> {
    if b.len() < 512 || le64(b, 0) != VOLATILE_MAGIC {
        return Err(Error::corrupt(
            "seSparse volatile header has no magic 0xcafecafe",
        ));
    }
    if le64(b, 24) != 0 {
        return Err(Error::unsupported(
            "seSparse extent is dirty: its journal needs replaying, which imgfs (like QEMU) \
             does not do; let ESXi consolidate it first",
        ));
    }
    if b[32..512].iter().any(|&x| x != 0) {
        return Err(Error::unsupported(
            "seSparse volatile header with non-zero padding",
        ));
    }
    Ok(())
}

/// Loads grain tables keyed by GD index (never stores: the extent is read-only).
struct GtIo {
    file: HostFile,
    gd: Vec<u64>,
    gt_offset: u64,
    file_len: u64,
}

impl GtIo {
    /// Byte offset of the table GD entry `idx` names; None when it names none.
    fn table_at(&self, idx: usize) -> Result<Option<u64>> {
        let Some(&e) = self.gd.get(idx) else {
            return Err(Error::corrupt(format!(
                "seSparse offset past the grain directory (entry {idx})"
            )));
        };
        if e == 0 {
            return Ok(None);
        }
        let bad = |why: &str| {
            Error::corrupt(format!(
                "seSparse grain directory entry {idx} ({e:#x}) {why}"
            ))
        };
        if e & 0xffff_ffff_0000_0000 != GDE_TABLE {
            return Err(bad("is not a table reference"));
        }
        let sector = (e & 0xffff_ffff)
            .checked_mul(GT_SECTORS)
            .and_then(|s| s.checked_add(self.gt_offset))
            .filter(|&s| s <= u32::MAX as u64)
            .ok_or_else(|| bad("points past 2 TiB"))?;
        let at = sector * SECTOR;
        if at + GT_SECTORS * SECTOR > self.file_len {
            return Err(bad("points outside the file"));
        }
        Ok(Some(at))
    }
}

impl TableIo for GtIo {
    fn load(&self, idx: u64, buf: &mut [u8]) -> Result<()> {
        match self.table_at(idx as usize)? {
            Some(at) => self.file.read_exact_at(buf, at),
            None => Err(Error::corrupt("seSparse grain table vanished")),
        }
    }
    fn store(&self, _idx: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::read_only("seSparse extents are read-only"))
    }
}

pub struct SeSparse {
    /// The engine's file number for `Extent::InFile`.
    file_no: u32,
    pub hdr: SeHeader,
    grains_at: u64,
    io: GtIo,
    cache: TableCache,
}

impl SeSparse {
    pub fn open(file_no: u32, file: HostFile, cache_size: u64) -> Result<SeSparse> {
        let mut b = [0u8; 512];
        file.read_exact_at(&mut b, 0)
            .map_err(|_| Error::corrupt("seSparse extent shorter than its header"))?;
        let hdr = SeHeader::parse(&b)?;
        let file_len = file.len()?;
        let region = |what: &str, sector: u64, bytes: u64| {
            sector
                .checked_mul(SECTOR)
                .filter(|at| at.checked_add(bytes).is_some_and(|e| e <= file_len))
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "seSparse {what} at sector {sector} lies outside the file"
                    ))
                })
        };
        let vol_at = region("volatile header", hdr.volatile_offset, SECTOR)?;
        file.read_exact_at(&mut b, vol_at)?;
        check_volatile(&b)?;
        let n = hdr.gd_entries();
        if n > MAX_GD_ENTRIES {
            return Err(Error::corrupt("seSparse grain directory too large"));
        }
        let gd_at = region("grain directory", hdr.gd_offset, n * 8)?;
        let mut raw = vec![0u8; (n * 8) as usize];
        file.read_exact_at(&mut raw, gd_at)?;
        let gd = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let grains_at = hdr
            .grains_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt("seSparse grains offset outside any file"))?;
        Ok(SeSparse {
            file_no,
            grains_at,
            io: GtIo {
                file,
                gd,
                gt_offset: hdr.gt_offset,
                file_len,
            },
            cache: TableCache::new((GT_SECTORS * SECTOR) as usize, cache_size),
            hdr,
        })
    }

    pub fn grain_bytes(&self) -> u64 {
        GRAIN
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    fn classify(&self, raw: u64) -> Result<Entry> {
        let bad = |why: &str| Error::corrupt(format!("seSparse grain table entry {raw:#x} {why}"));
        match raw & 0xf000_0000_0000_0000 {
            0 if raw == 0 => Ok(Entry::Unalloc),
            0 => Err(bad("is unallocated but not zero")),
            GTE_UNMAPPED | GTE_ZERO => Ok(Entry::Zero),
            GTE_ALLOCATED => {
                let number = ((raw >> 48) & 0xfff) | ((raw & 0xffff_ffff_ffff) << 12);
                let host = number
                    .checked_mul(GRAIN)
                    .and_then(|o| o.checked_add(self.grains_at))
                    .filter(|h| h.checked_add(GRAIN).is_some_and(|e| e <= self.io.file_len))
                    .ok_or_else(|| bad("points outside the file"))?;
                Ok(Entry::Grain(host))
            }
            _ => Err(bad("has an unknown type")),
        }
    }

    /// Map extent offset `off` for reading: the run of same-kind grains (contiguous on disk for
    /// allocated ones) within one grain table, at most `len` bytes.
    pub fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let idx = off / GT_SPAN;
        let len = len.min(GT_SPAN - off % GT_SPAN);
        let Some(_) = self.io.table_at(idx as usize)? else {
            return Ok(Extent::Backing { len });
        };
        let first = ((off % GT_SPAN) / GRAIN) as usize;
        let in_grain = off % GRAIN;
        let grains = (in_grain + len).div_ceil(GRAIN) as usize;
        let (e0, n) = self
            .cache
            .with(&self.io, idx, |t| -> Result<(Entry, u64)> {
                let at = |i: usize| le64(t, (first + i) * 8);
                let e0 = self.classify(at(0))?;
                let mut n = 1;
                while n < grains {
                    let e = self.classify(at(n))?;
                    if !e0.continued_by(e, n, GRAIN) {
                        break;
                    }
                    n += 1;
                }
                Ok((e0, n as u64))
            })??;
        let run = (n * GRAIN - in_grain).min(len);
        Ok(match e0 {
            Entry::Unalloc => Extent::Backing { len: run },
            Entry::Zero => Extent::Zero { len: run },
            Entry::Grain(host) => Extent::InFile {
                file: self.file_no,
                host: host + in_grain,
                len: run,
            },
        })
    }

    /// For `check`: every problem in the directory and tables (entries of unknown type, tables
    /// and grains outside the file, grains used twice), and the grains allocated.
    pub fn check(&self) -> Result<(Vec<String>, u64)> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut allocated = 0;
        for idx in 0..self.io.gd.len() {
            match self.io.table_at(idx) {
                Ok(None) => continue,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
                Ok(Some(_)) => {}
            }
            let t = self.cache.with(&self.io, idx as u64, |t| t.to_vec())?;
            for (j, c) in t.chunks_exact(8).enumerate() {
                match self.classify(le64(c, 0)) {
                    Ok(Entry::Grain(host)) if !seen.insert(host) => problems.push(format!(
                        "grain table {idx} entry {j}: grain at {host:#x} also used by another entry"
                    )),
                    Ok(Entry::Grain(_)) => allocated += 1,
                    Ok(_) => {}
                    Err(e) => problems.push(format!("grain table {idx} entry {j}: {e}")),
                }
            }
        }
        Ok((problems, allocated))
    }
}

/// The const header of an extent placed as `h` says, with grain tables and grains regions of
/// `gt_size` and `grains_size` sectors.
#[cfg(test)]
fn const_header(h: &SeHeader, gt_size: u64, grains_size: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    let mut put = |i: usize, v: u64| b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    put(0, CONST_MAGIC);
    put(1, VERSION);
    put(2, h.capacity);
    put(3, GRAIN_SECTORS);
    put(4, GT_SECTORS);
    put(10, h.volatile_offset);
    put(11, 1);
    put(16, h.gd_offset);
    put(17, h.gd_size);
    put(18, h.gt_offset);
    put(19, gt_size);
    put(24, h.grains_offset);
    put(25, grains_size);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SeHeader {
        SeHeader {
            capacity: 1 << 16,
            volatile_offset: 1,
            gd_offset: 2,
            gd_size: 1,
            gt_offset: 3,
            grains_offset: 67,
        }
    }

    #[test]
    fn const_header_round_trips_and_refuses_what_qemu_refuses() {
        let good = const_header(&header(), 64, 8);
        assert_eq!(SeHeader::parse(&good).unwrap(), header());
        for (field, val, what) in [
            (0usize, 1u64, "magic"),
            (1, 1, "version"),
            (3, 16, "grain size"),
            (4, 128, "grain table size"),
            (5, 1, "flags"),
            (7, 1, "reserved"),
            (2, u64::MAX, "64 TiB"),
            (17, 0, "cannot map"),
            (17, u64::MAX, "cannot map"),
        ] {
            let mut b = good;
            b[field * 8..field * 8 + 8].copy_from_slice(&val.to_le_bytes());
            let e = SeHeader::parse(&b).unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
        }
        let mut b = good;
        b[400] = 1;
        assert!(SeHeader::parse(&b).is_err());
    }

    #[test]
    fn volatile_header_must_need_no_replay() {
        let mut v = [0u8; 512];
        v[..8].copy_from_slice(&VOLATILE_MAGIC.to_le_bytes());
        check_volatile(&v).unwrap();
        v[24] = 1;
        assert!(check_volatile(&v)
            .unwrap_err()
            .to_string()
            .contains("dirty"));
        v[24] = 0;
        v[100] = 1;
        assert!(check_volatile(&v).is_err());
        assert!(check_volatile(&[0u8; 512]).is_err());
    }
}
