//! The Block Allocation Table: one u64 per payload block, with a sector-bitmap entry after
//! every `chunk_ratio` payload entries.
//!
//! ```text
//!   BAT entry (u64 LE): bits 0-2 state, bits 20-63 file offset in MiB
//!   [pb 0][pb 1] ... [pb cr-1][sb 0][pb cr] ... [pb 2cr-1][sb 1] ...
//!   chunk_ratio (cr) = 2^23 * logical_sector_size / block_size
//!   sector bitmap block (1 MiB): bit (s % 8) of byte s / 8 = sector s of the chunk present
//! ```

use super::header::{Region, MIB};
use super::metadata::Metadata;
use crate::error::{Error, Result};

pub const PAGE_SIZE: u64 = 4096;

pub const NOT_PRESENT: u64 = 0;
pub const UNDEFINED: u64 = 1;
pub const ZERO: u64 = 2;
pub const UNMAPPED: u64 = 3;
pub const FULLY_PRESENT: u64 = 6;
pub const PARTIALLY_PRESENT: u64 = 7;
/// Sector-bitmap entry state.
pub const SB_PRESENT: u64 = 6;

pub fn state(e: u64) -> u64 {
    e & 7
}
pub fn offset(e: u64) -> u64 {
    (e >> 20) << 20
}
pub fn entry(state: u64, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | state
}

/// Sizes derived from the metadata, with the BAT region checked against them.
#[derive(Debug, Clone)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub virtual_size: u64,
    pub has_parent: bool,
    pub chunk_ratio: u64,
    pub sectors_per_block: u64,
    pub data_blocks: u64,
    pub bat_entries: u64,
    pub bat: Region,
}

impl Geometry {
    pub fn new(m: &Metadata, bat: Region) -> Result<Geometry> {
        let chunk_ratio = (1u64 << 23) * m.logical_sector / m.block_size;
        let data_blocks = m.virtual_size.div_ceil(m.block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let bat_entries = if m.has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        if bat_entries > bat.length / 8 {
            return Err(Error::corrupt(format!(
                "VHDX BAT region ({:#x} bytes) too small for {bat_entries} entries",
                bat.length
            ))
            .at(bat.offset));
        }
        Ok(Geometry {
            block_size: m.block_size,
            logical_sector: m.logical_sector,
            virtual_size: m.virtual_size,
            has_parent: m.has_parent,
            chunk_ratio,
            sectors_per_block: m.block_size / m.logical_sector,
            data_blocks,
            bat_entries,
            bat,
        })
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }
    /// Host offset of BAT entry `idx`.
    pub fn entry_pos(&self, idx: u64) -> u64 {
        self.bat.offset + idx * 8
    }
    /// Sector number inside the chunk's bitmap for `block`'s sector `sector_in_block`.
    pub fn bitmap_bit(&self, block: u64, sector_in_block: u64) -> u64 {
        (block % self.chunk_ratio) * self.sectors_per_block + sector_in_block
    }
    /// Is `idx` a sector-bitmap entry?
    pub fn is_bitmap_index(&self, idx: u64) -> bool {
        idx % (self.chunk_ratio + 1) == self.chunk_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::vhdx::header::Guid;

    fn meta(bs: u64, ls: u64, size: u64, parent: bool) -> Metadata {
        Metadata {
            block_size: bs,
            leave_blocks_allocated: false,
            has_parent: parent,
            virtual_size: size,
            page83: Guid::ZERO,
            logical_sector: ls,
            physical_sector: 4096,
            parent: vec![],
        }
    }

    #[test]
    fn chunk_ratio_and_indices() {
        let r = Region {
            offset: 2 * MIB,
            length: MIB,
        };
        let g = Geometry::new(&meta(MIB, 512, 10 * MIB, false), r).unwrap();
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.bat_entries, 10);
        let g = Geometry::new(&meta(32 * MIB, 512, 1 << 40, false), r).unwrap();
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(0), 128);
        assert!(g.is_bitmap_index(128));
        let g = Geometry::new(&meta(MIB, 4096, 10 * MIB, true), r).unwrap();
        assert_eq!(g.chunk_ratio, 32768);
        assert_eq!(g.bat_entries, 32769);
        // 64 TiB with 1 MiB blocks needs 512 MiB of BAT: a 1 MiB region is refused.
        assert!(Geometry::new(&meta(MIB, 512, 64 << 40, false), r).is_err());
    }

    #[test]
    fn entry_fields() {
        let e = entry(FULLY_PRESENT, 5 * MIB);
        assert_eq!(state(e), FULLY_PRESENT);
        assert_eq!(offset(e), 5 * MIB);
    }
}
