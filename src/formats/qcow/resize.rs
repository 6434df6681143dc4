//! Growing a qcow (v1) image's virtual disk. QEMU cannot resize this format; imgfs can grow it.
//! The L1 table's length follows from the size, so a size that needs more L1 entries moves the
//! table to the end of the file:
//!
//! ```text
//!   flush (old L1 current on disk)
//!   [ ... data / L2 ... ][ new L1: old entries + zeros ]  written, file extended, sync
//!   header bytes 24..48 {size, cluster_bits, l2_bits, crypt_method, l1_table_offset}:
//!   one sector write, sync
//! ```
//! A cut before the header write leaves the old image (the new table is dead space, as qcow
//! leaves any unreferenced cluster); after it, the grown one. The old table becomes dead space.

use super::header::HEADER_LEN;
use super::QcowMap;
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;

/// Header offset of the size; the geometry fields and l1_table_offset follow up to byte 48.
const OFF_SIZE: u64 = 24;

impl QcowMap {
    pub(super) fn resize_to(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("qcow image is open read-only"));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "qcow sizes are whole 512-byte sectors; {new_size} is not"
            )));
        }
        if new_size < self.size.load(Ordering::Acquire) {
            return Err(Error::unsupported("shrinking qcow images is not supported"));
        }
        let need = new_size.div_ceil(1 << self.hdr.l2_span_bits());
        if need * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                format!("a qcow disk of {new_size} bytes needs an L1 table larger than 32 MiB"),
            ));
        }
        let mut file_end = self.lock_alloc();
        self.flush_locked()?;
        let mut l1_off = self.l1_offset.load(Ordering::Acquire);
        let old_entries = self.read_l1().len() as u64;
        if need > old_entries {
            let mut bytes: Vec<u8> = self
                .read_l1()
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            bytes.resize(need as usize * 8, 0);
            let table = *file_end;
            let end = table + (need * 8).div_ceil(self.cs) * self.cs;
            self.file.write_all_at(&bytes, table)?;
            if self.file.len()? < end {
                self.file.set_len(end)?;
            }
            *file_end = end;
            self.file_size.fetch_max(end, Ordering::SeqCst);
            self.file.sync()?;
            l1_off = table;
        }
        let mut h = self.hdr.clone();
        h.size = new_size;
        h.l1_table_offset = l1_off;
        let b = h.to_bytes();
        self.file
            .write_all_at(&b[OFF_SIZE as usize..HEADER_LEN], OFF_SIZE)?;
        self.file.sync()?;
        self.l1.write().resize(need.max(old_entries) as usize, 0);
        self.l1_offset.store(l1_off, Ordering::Release);
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
