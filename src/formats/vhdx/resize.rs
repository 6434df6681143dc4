//! Growing a VHDX image's virtual disk. The size lives in the metadata region's "virtual disk
//! size" item, which changes only through the log (write-ahead), as every metadata change does:
//!
//! ```text
//!   flush (earlier BAT changes logged and applied)
//!   BAT entries the new size brings into use that are not NOT_PRESENT -> zeroed, logged, applied
//!   metadata page holding the virtual disk size -> new size, logged (sync), applied in place
//! ```
//! A cut before the size's log entry is durable leaves the old size (any BAT tail it zeroed
//! lies past the old size's entries); after it, replay at the next open gives the new one.
//! The BAT region is not moved: a size needing more entries than it holds is refused with the
//! largest size it allows.

use super::bat::{BatEntry, PAGE_SIZE};
use super::map::VhdxMap;
use super::metadata::{MAX_VIRTUAL_SIZE, TABLE_SIZE, VIRTUAL_DISK_SIZE};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::le32;
use std::sync::atomic::Ordering;

impl VhdxMap {
    /// BAT entries a disk of `size` bytes uses (spec 2.5: payload entries with a sector-bitmap
    /// entry after every `chunk_ratio` of them; all of the last chunk's for differencing disks).
    fn bat_entries_for(&self, size: u64) -> u64 {
        let g = &self.geo;
        let blocks = size.div_ceil(g.block_size);
        if g.has_parent {
            blocks.div_ceil(g.chunk_ratio) * (g.chunk_ratio + 1)
        } else {
            blocks + blocks.saturating_sub(1) / g.chunk_ratio
        }
    }

    /// The largest size (whole blocks) whose entries fit the BAT region.
    fn max_size_for_bat(&self) -> u64 {
        let cap = self.geo.bat.length / 8;
        let cr = self.geo.chunk_ratio;
        let mut blocks = cap * cr / (cr + 1) + 1;
        while blocks > 0 && self.bat_entries_for(blocks * self.geo.block_size) > cap {
            blocks -= 1;
        }
        (blocks * self.geo.block_size).min(MAX_VIRTUAL_SIZE)
    }

    /// File offset of the virtual disk size item's value.
    fn size_item_pos(&self) -> Result<u64> {
        let region = self.regions.metadata;
        let mut table = vec![0u8; TABLE_SIZE];
        self.file.read_exact_at(&mut table, region.offset)?;
        let count = u16::from_le_bytes([table[10], table[11]]) as usize;
        (0..count.min(TABLE_SIZE / 32 - 1))
            .map(|i| 32 + 32 * i)
            .find(|&e| super::header::Guid::read(&table, e) == VIRTUAL_DISK_SIZE)
            .map(|e| region.offset + u64::from(le32(&table, e + 16)))
            .ok_or_else(|| Error::corrupt("VHDX metadata has no virtual disk size item"))
    }

    pub(super) fn resize_to(&self, new_size: u64) -> Result<()> {
        let g = &self.geo;
        let old = self.size.load(Ordering::Acquire);
        if !new_size.is_multiple_of(g.logical_sector) {
            return Err(Error::invalid(format!(
                "VHDX sizes are whole {}-byte logical sectors; {new_size} is not",
                g.logical_sector
            )));
        }
        if new_size < old {
            return Err(Error::unsupported("shrinking VHDX images is not supported"));
        }
        let max = self.max_size_for_bat();
        if new_size > max {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "the VHDX BAT region ({} bytes) maps at most {max} bytes with {} MiB blocks; \
                     {new_size} needs a larger BAT region (convert the image, e.g. with \
                     qemu-img convert, to grow it further)",
                    g.bat.length,
                    g.block_size >> 20
                ),
            ));
        }
        let pos = self.size_item_pos()?;
        let mut st = self.st_lock();
        self.begin_write(&mut st)?;
        self.flush_locked(&mut st)?;
        let (first, end) = (self.bat_entries_for(old), self.bat_entries_for(new_size));
        for idx in first..end {
            if self.read_entry(idx)? != BatEntry(0) {
                self.write_entry(&mut st, idx, BatEntry(0))?;
            }
        }
        if !self.dirty.read().is_empty() {
            self.flush_locked(&mut st)?;
        }
        let bytes = new_size.to_le_bytes();
        for (i, b) in bytes.iter().enumerate() {
            let at = pos + i as u64;
            let page = at & !(PAGE_SIZE - 1);
            self.page_mut(&mut st, page, |p| p[(at - page) as usize] = *b)?;
        }
        self.flush_locked(&mut st)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
