//! Sector bitmaps of differencing images: one bit per logical sector, set when the sector is
//! present in this image (clear: read it from the parent).
//!
//! ```text
//!   bitmap block (1 MiB) of chunk c = BAT entry c*(cr+1)+cr
//!   bit (b % cr) * sectors_per_block + s  ->  byte bit/8, bit bit%8 (LSB first)
//! ```

use super::bat::{SectorBitmap, PAGE_SIZE};
use super::header::MIB;
use super::map::{State, VhdxMap};
use crate::error::{Error, Result};
use crate::format::Below;

impl VhdxMap {
    /// Host offset of `block`'s chunk sector bitmap, if present.
    pub(super) fn bitmap_block(&self, block: u64) -> Result<Option<u64>> {
        let idx = self.geo.bitmap_index(block / self.geo.chunk_ratio);
        let e = self.read_entry(idx)?;
        match e.bitmap_state() {
            SectorBitmap::Present => Ok(Some(self.checked_offset(idx, e, MIB)?)),
            SectorBitmap::NotPresent => Ok(None),
            SectorBitmap::Reserved(s) => Err(Error::corrupt(format!(
                "VHDX sector bitmap entry {idx} has state {s}"
            ))
            .at(self.geo.entry_pos(idx))),
        }
    }

    /// Length of the run of sectors with the same bitmap bit from `inb` (at most `n` bytes),
    /// and whether they are present.
    pub(super) fn bitmap_run(&self, bm: u64, block: u64, inb: u64, n: u64) -> Result<(bool, u64)> {
        let ls = self.geo.logical_sector;
        let s0 = inb / ls;
        let s_end = (inb + n).div_ceil(ls);
        let bit0 = self.geo.bitmap_bit(block, s0);
        let page = bm + ((bit0 / 8) & !(PAGE_SIZE - 1));
        let page_bit0 = (page - bm) * 8;
        let limit = (s_end - s0).min(PAGE_SIZE * 8 - (bit0 - page_bit0));
        self.with_page(page, |p| {
            let get = |b: u64| p[((b - page_bit0) / 8) as usize] >> ((b - page_bit0) % 8) & 1 == 1;
            let first = get(bit0);
            let mut k = 1;
            while k < limit && get(bit0 + k) == first {
                k += 1;
            }
            (first, ((s0 + k) * ls - inb).min(n))
        })
    }

    pub(super) fn set_bits(
        &self,
        st: &mut State,
        bm: u64,
        block: u64,
        s0: u64,
        s1: u64,
    ) -> Result<()> {
        let mut b = self.geo.bitmap_bit(block, s0);
        let end = self.geo.bitmap_bit(block, s0) + (s1 - s0);
        while b < end {
            let page = bm + ((b / 8) & !(PAGE_SIZE - 1));
            let page_bit0 = (page - bm) * 8;
            let stop = end.min(page_bit0 + PAGE_SIZE * 8);
            self.page_mut(st, page, |p| {
                for bit in b..stop {
                    let rel = bit - page_bit0;
                    p[(rel / 8) as usize] |= 1 << (rel % 8);
                }
            })?;
            b = stop;
        }
        Ok(())
    }

    pub(super) fn clear_block_bits(&self, st: &mut State, bm: u64, block: u64) -> Result<()> {
        let spb = self.geo.sectors_per_block;
        let first = self.geo.bitmap_bit(block, 0);
        // sectors_per_block is a multiple of 8 (block >= 1 MiB, sector <= 4 KiB).
        let (byte0, nbytes) = (first / 8, spb / 8);
        let mut done = 0;
        while done < nbytes {
            let byte = byte0 + done;
            let page = bm + (byte & !(PAGE_SIZE - 1));
            let at = (byte - (page - bm)) as usize;
            let n = (nbytes - done).min(PAGE_SIZE - at as u64) as usize;
            self.page_mut(st, page, |p| p[at..at + n].fill(0))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Fill the partial head/tail sectors of a write into a partially present block from below,
    /// and mark the written sectors present.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_partial(
        &self,
        st: &mut State,
        bm: u64,
        block: u64,
        host: u64,
        inb: u64,
        n: u64,
        below: &dyn Below,
    ) -> Result<()> {
        let ls = self.geo.logical_sector;
        let s0 = inb / ls;
        let s1 = (inb + n).div_ceil(ls);
        let mut edges = vec![];
        if !inb.is_multiple_of(ls) {
            edges.push(s0);
        }
        if !(inb + n).is_multiple_of(ls) && !edges.contains(&(s1 - 1)) {
            edges.push(s1 - 1);
        }
        for s in edges {
            let (present, _) = self.bitmap_run(bm, block, s * ls, ls)?;
            if !present {
                let mut buf = vec![0u8; ls as usize];
                below.read_below(block * self.geo.block_size + s * ls, &mut buf)?;
                self.file.write_all_at(&buf, host + s * ls)?;
            }
        }
        self.set_bits(st, bm, block, s0, s1)
    }
}
