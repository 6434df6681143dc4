//! Flat extents (`FLAT`, `VMFS`): the guest bytes lie in place in a plain file, from the
//! extent's offset on. A disk split into 2 GiB files is a list of these.

use crate::error::{Error, Result};
use crate::format::Extent;

#[derive(Debug, Clone, Copy)]
pub struct Flat {
    /// The engine's file number for `Extent::InFile`.
    pub file_no: u32,
    /// Byte offset of the extent's first guest byte in the file.
    pub offset: u64,
}

impl Flat {
    pub fn new(file_no: u32, offset_sectors: u64, len: u64) -> Result<Flat> {
        let offset = offset_sectors
            .checked_mul(512)
            .filter(|o| o.checked_add(len).is_some())
            .ok_or_else(|| Error::corrupt("VMDK flat extent offset out of range"))?;
        Ok(Flat { file_no, offset })
    }

    /// `rel` bytes into the extent, `len` bytes at most: in place.
    pub fn map(&self, rel: u64, len: u64) -> Extent {
        Extent::InFile {
            file: self.file_no,
            host: self.offset + rel,
            len,
        }
    }
}
