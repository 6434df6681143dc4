//! ESX sparse extents (`COWD`, VMDK3): the `-delta.vmdk` files of `vmfsSparse` snapshot deltas,
//! named by `VMFSSPARSE` (or `SPARSE`) extent lines of a descriptor. QEMU reads and writes them;
//! so does imgfs, through the KDMV machinery (sparse.rs) with the header translated below.
//!
//! ```text
//!  | header (2048 bytes) | GD (u32 each) | GTs (4096 x u32) | grains (appended) ...
//!  header: "COWD" | version | flags | numSectors | grainSize | gdOffset | numGDEntries | freeSector |
//!          (root: geometry | child: parent name, parent generation) | generation | name | ...
//!          all u32 little-endian; sizes and offsets in 512-byte sectors
//!  GD[i] = sector of GT i (0: none)     GT[j] = sector of grain j (0: unallocated: the parent)
//! ```
//!
//! Unlike KDMV there is no redundant directory, no zeroed-grain entry and a fixed table of 4096
//! entries (ESX uses 512-byte grains: a table maps 2 MiB). `freeSector` is the next free sector
//! as VMware's allocator sees it; QEMU ignores it, imgfs raises it past every grain before a table
//! may point there (sparse.rs `GtIo::sync_grains`), so VMware never hands out a sector in use.

use super::sparse::{Header, MAX_GD_ENTRIES, MAX_GRAIN_SECTORS, SECTOR};
use crate::error::{Error, Result};
use crate::formats::le32;

pub const MAGIC: &[u8; 4] = b"COWD";
/// Header bytes (4 sectors).
pub const HEADER_LEN: usize = 2048;
/// Entries per grain table (fixed by the format).
pub const GT_ENTRIES: u32 = 4096;
/// Byte offset of `freeSector` in the header.
pub const FREE_SECTOR_AT: u64 = 28;

/// The fields of a COWD header that place data (the rest is VMware's bookkeeping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CowdHeader {
    pub version: u32,
    pub flags: u32,
    pub sectors: u32,
    pub grain: u32,
    pub gd_offset: u32,
    pub gd_entries: u32,
    pub free_sector: u32,
}

impl CowdHeader {
    /// Parse and bound a header. QEMU checks only grain <= 1 GiB and GD <= 32M entries (and
    /// divides by a zero grain); imgfs also refuses a directory inside the header and one too
    /// small for the capacity (reads there would fail in QEMU too).
    pub fn parse(b: &[u8]) -> Result<CowdHeader> {
        if b.len() < 32 || &b[..4] != MAGIC {
            return Err(Error::corrupt("not an ESX sparse extent (no COWD magic)"));
        }
        let h = CowdHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            sectors: le32(b, 12),
            grain: le32(b, 16),
            gd_offset: le32(b, 20),
            gd_entries: le32(b, 24),
            free_sector: le32(b, 28),
        };
        let grain = h.grain as u64;
        if grain == 0 || !grain.is_power_of_two() || grain > MAX_GRAIN_SECTORS {
            return Err(Error::corrupt(format!(
                "COWD grain size {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                h.grain
            )));
        }
        if (h.gd_offset as u64) < (HEADER_LEN as u64 / SECTOR) {
            return Err(Error::corrupt(format!(
                "COWD grain directory at sector {} overlaps the 4-sector header",
                h.gd_offset
            )));
        }
        let needed = h.needed_gd_entries();
        if (h.gd_entries as u64) < needed {
            return Err(Error::corrupt(format!(
                "COWD grain directory of {} entries cannot map {} sectors (needs {needed})",
                h.gd_entries, h.sectors
            )));
        }
        if needed > MAX_GD_ENTRIES {
            return Err(Error::corrupt("COWD grain directory too large"));
        }
        Ok(h)
    }

    fn needed_gd_entries(&self) -> u64 {
        (self.sectors as u64).div_ceil(self.grain as u64 * GT_ENTRIES as u64)
    }

    /// The same extent described as a KDMV header, for sparse.rs: 4096-entry tables, flags 0
    /// (no redundant directory, no zeroed-grain entries, no compression). `overhead` is the end
    /// of the directory: everything past it is a table or a grain.
    pub fn as_sparse(&self) -> Header {
        let gd_sectors = (self.needed_gd_entries() * 4).div_ceil(SECTOR);
        Header {
            version: self.version,
            flags: 0,
            capacity: self.sectors as u64,
            grain: self.grain as u64,
            desc_offset: 0,
            desc_size: 0,
            gtes_per_gt: GT_ENTRIES,
            rgd_offset: 0,
            gd_offset: self.gd_offset as u64,
            overhead: self.gd_offset as u64 + gd_sectors,
            unclean: 0,
            compress: 0,
        }
    }

    /// A header with these fields, the rest zero.
    #[cfg(test)]
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        for (i, v) in [
            self.version,
            self.flags,
            self.sectors,
            self.grain,
            self.gd_offset,
            self.gd_entries,
            self.free_sector,
        ]
        .into_iter()
        .enumerate()
        {
            b[4 + i * 4..8 + i * 4].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> CowdHeader {
        CowdHeader {
            version: 1,
            flags: 3,
            sectors: 8192,
            grain: 1,
            gd_offset: 4,
            gd_entries: 2,
            free_sector: 5,
        }
    }

    #[test]
    fn parses_and_translates() {
        let h = header();
        assert_eq!(CowdHeader::parse(&h.to_bytes()).unwrap(), h);
        let s = h.as_sparse();
        assert_eq!(s.gt_span(), 2 << 20);
        assert_eq!(s.gd_entries(), 2);
        assert_eq!(s.overhead, 5);
        assert!(!s.has_rgd() && !s.zero_grain() && !s.compressed());
    }

    #[test]
    fn refuses_hostile_fields() {
        for (f, what) in [
            (
                (|h: &mut CowdHeader| h.grain = 0) as fn(&mut CowdHeader),
                "grain",
            ),
            (|h| h.grain = 3, "grain"),
            (|h| h.grain = 1 << 20, "grain"),
            (|h| h.gd_offset = 1, "overlaps"),
            (|h| h.gd_entries = 1, "cannot map"),
            (
                |h| {
                    h.sectors = u32::MAX;
                    h.gd_entries = u32::MAX;
                },
                "",
            ),
        ] {
            let mut h = header();
            f(&mut h);
            match CowdHeader::parse(&h.to_bytes()) {
                Err(e) => assert!(e.to_string().contains(what), "{what}: {e}"),
                // 2 TiB of 512-byte grains: 1M directory entries, within the bound.
                Ok(h) => assert!(h.as_sparse().gd_entries() <= MAX_GD_ENTRIES),
            }
        }
        assert!(CowdHeader::parse(b"KDMV").is_err());
    }
}
