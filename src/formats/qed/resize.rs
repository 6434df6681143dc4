//! Growing a QED image's virtual disk. The L1 table always spans everything the table geometry
//! can map, so growing is one 8-byte write of `image_size` (header byte 48), synced: a cut
//! leaves the old size or the new one. Past the geometry's limit (QEMU's own formula, which
//! it checks at open) the answer is a clear error naming the limit.

use super::header::{max_image_size, qemu_max_image_size};
use super::QedMap;
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::Ordering;

const OFF_IMAGE_SIZE: u64 = 48;

/// The largest size QEMU (and imgfs) accept for this geometry.
pub fn limit(cluster_size: u32, table_size: u32) -> u64 {
    let exact = max_image_size(cluster_size, table_size).min(u64::MAX as u128) as u64;
    match qemu_max_image_size(cluster_size, table_size) {
        0 => exact,
        q => q.min(exact),
    }
}

impl QedMap {
    pub(super) fn resize_to(&self, new_size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("QED image is open read-only"));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::invalid(format!(
                "QED sizes are whole 512-byte sectors; {new_size} is not"
            )));
        }
        if new_size < self.size.load(Ordering::Acquire) {
            return Err(Error::unsupported(
                "shrinking QED images is not supported (nor by QEMU)",
            ));
        }
        let max = limit(self.hdr.cluster_size, self.hdr.table_size);
        if new_size > max {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "a QED image with {} KiB clusters and tables of {} clusters maps at most {max} \
                     bytes; {new_size} is past that limit",
                    self.hdr.cluster_size >> 10,
                    self.hdr.table_size
                ),
            ));
        }
        // Under the allocation lock: a need-check header write must not undo the new size.
        let _a = self.lock_alloc();
        self.file
            .write_all_at(&new_size.to_le_bytes(), OFF_IMAGE_SIZE)?;
        self.file.sync()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
