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

/// The state of a payload block's BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    NotPresent,
    Undefined,
    Zero,
    Unmapped,
    FullyPresent,
    PartiallyPresent,
    /// 4 or 5: reserved, invalid.
    Reserved(u64),
}

impl Payload {
    fn code(self) -> u64 {
        match self {
            Payload::NotPresent => 0,
            Payload::Undefined => 1,
            Payload::Zero => 2,
            Payload::Unmapped => 3,
            Payload::FullyPresent => 6,
            Payload::PartiallyPresent => 7,
            Payload::Reserved(s) => s,
        }
    }
}

/// The state of a sector bitmap block's BAT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorBitmap {
    NotPresent,
    Present,
    /// Any other state: invalid.
    Reserved(u64),
}

const SB_PRESENT: u64 = 6;

/// One BAT entry as stored: bits 0-2 state, bits 20-63 file offset in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// The entry of a payload block in state `state` at file offset `offset` (whole MiB).
    pub fn payload(state: Payload, offset: u64) -> BatEntry {
        BatEntry((offset & !(MIB - 1)) | state.code())
    }
    /// The entry of a present sector bitmap block at `offset`.
    pub fn bitmap(offset: u64) -> BatEntry {
        BatEntry((offset & !(MIB - 1)) | SB_PRESENT)
    }
    /// The raw state bits (0-7).
    pub fn state(self) -> u64 {
        self.0 & 7
    }
    pub fn offset(self) -> u64 {
        (self.0 >> 20) << 20
    }
    /// The state, read as a payload block entry.
    pub fn payload_state(self) -> Payload {
        match self.state() {
            0 => Payload::NotPresent,
            1 => Payload::Undefined,
            2 => Payload::Zero,
            3 => Payload::Unmapped,
            6 => Payload::FullyPresent,
            7 => Payload::PartiallyPresent,
            s => Payload::Reserved(s),
        }
    }
    /// The state, read as a sector bitmap entry.
    pub fn bitmap_state(self) -> SectorBitmap {
        match self.state() {
            0 => SectorBitmap::NotPresent,
            SB_PRESENT => SectorBitmap::Present,
            s => SectorBitmap::Reserved(s),
        }
    }
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
    fn entries_round_trip() {
        for s in [0, 1, 2, 3, 4, 5, 6, 7] {
            let e = BatEntry((5 << 20) | s);
            assert_eq!(BatEntry::payload(e.payload_state(), e.offset()), e);
            assert_eq!(e.offset(), 5 << 20);
            assert_eq!(e.state(), s);
        }
        assert_eq!(
            BatEntry::payload(Payload::FullyPresent, 3 << 20).0,
            (3 << 20) | 6
        );
        assert_eq!(BatEntry::bitmap(MIB).bitmap_state(), SectorBitmap::Present);
        assert_eq!(BatEntry(0).bitmap_state(), SectorBitmap::NotPresent);
        assert_eq!(BatEntry(7).bitmap_state(), SectorBitmap::Reserved(7));
        assert_eq!(BatEntry(4).payload_state(), Payload::Reserved(4));
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
        let e = BatEntry::payload(Payload::FullyPresent, 5 * MIB);
        assert_eq!(e.payload_state(), Payload::FullyPresent);
        assert_eq!(e.offset(), 5 * MIB);
    }
}
