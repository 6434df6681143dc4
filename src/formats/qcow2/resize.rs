//! Growing a qcow2 image's virtual disk (online through the mount, offline by `imgfs resize`).
//!
//! ```text
//!   new size still fits the L1 table:   header.size <- new, sync
//!   L1 table must grow:                 flush everything (old L1 current on disk)
//!                                       new L1 clusters allocated at the end (refcount 1)
//!                                       old entries + zeros written there
//!                                       flush: file extended, synced, refcounts durable
//!                                       header bytes 24..48 {size, crypt_method, l1_size,
//!                                         l1_table_offset} in one sector write, sync
//!                                       old L1 clusters freed (deferred: applied by a flush)
//! ```
//! A cut before the header write leaves the old image plus the new L1's clusters as leaks;
//! after it, the grown image (plus, until the next flush, the old L1 as a leak).

use super::header::{Header, MAX_L1_BYTES};
use super::map::Alloc;
use super::{write, Qcow2Map};
use crate::error::{Error, Result};
use std::sync::atomic::Ordering;

/// Byte offset of the virtual size in the header; crypt_method, l1_size and l1_table_offset
/// follow it up to byte 48.
const OFF_SIZE: u64 = 24;

pub fn resize(map: &Qcow2Map, new_size: u64) -> Result<()> {
    if map.read_only || map.snapshot_view.is_some() {
        return Err(Error::read_only("qcow2 image is open read-only"));
    }
    if !new_size.is_multiple_of(512) {
        return Err(Error::invalid(format!(
            "qcow2 sizes are whole 512-byte sectors; {new_size} is not"
        )));
    }
    let old = map.size.load(Ordering::Acquire);
    if new_size < old {
        return Err(Error::unsupported(
            "shrinking qcow2 images is not supported by imgfs (qemu-img resize --shrink can)",
        ));
    }
    let g = &map.m.geo;
    let need = Header::l1_entries_for(new_size, g.cluster_bits, g.l2_entries);
    if need * 8 > MAX_L1_BYTES {
        return Err(Error::new(
            crate::error::ErrorKind::NoSpace,
            format!(
                "a qcow2 disk of {new_size} bytes needs an L1 table of {need} entries, more \
                 than the 32 MiB QEMU accepts (use larger clusters)"
            ),
        ));
    }
    let mut ag = map.m.lock_alloc();
    let a = &mut *ag;
    write::prepare(map, a)?;
    if g.data_raw && map.m.data.len()? < new_size {
        // The raw data file is the disk: it grows with it (as QEMU grows it).
        map.m.data.set_len(new_size)?;
        map.m.data.sync()?;
    }
    if need > map.m.l1.read().entries.len() as u64 {
        grow_l1(map, a, new_size, need)?;
    } else {
        write_geometry(map, new_size, None)?;
    }
    map.size.store(new_size, Ordering::Release);
    // Apply the deferred free of the old L1 now rather than at the next fsync.
    write::flush(map, a)
}

/// Move the active L1 table to new clusters of `need` entries and point the header at it.
/// L1 entries change only under the allocation lock (`a`), which the caller holds throughout.
fn grow_l1(map: &Qcow2Map, a: &mut Alloc, new_size: u64, need: u64) -> Result<()> {
    let cs = map.m.geo.cs;
    write::flush(map, a)?;
    let clusters = (need * 8).div_ceil(cs);
    let rc =
        a.rc.as_mut()
            .ok_or_else(|| Error::read_only("qcow2 image is open read-only"))?;
    let new_off = rc.alloc(clusters)?;
    let mut l1 = map.m.l1.read().entries.clone();
    l1.resize(need as usize, 0);
    let mut raw = vec![0u8; (clusters * cs) as usize];
    for (i, e) in l1.iter().enumerate() {
        raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
    }
    map.m.file.write_all_at(&raw, new_off)?;
    // Extends the file over the new clusters, syncs them, makes their refcounts durable.
    write::flush(map, a)?;
    write_geometry(map, new_size, Some((need as u32, new_off)))?;
    let (old_off, old_bytes) = {
        let mut cur = map.m.l1.write();
        let old = (cur.offset, cur.entries.len() as u64 * 8);
        cur.entries = l1;
        cur.offset = new_off;
        old
    };
    if old_bytes > 0 {
        if let Some(rc) = a.rc.as_mut() {
            rc.defer_free(old_off, old_bytes);
        }
    }
    Ok(())
}

/// Write the virtual size (and, when the L1 moved, its size and offset) in one write, synced.
fn write_geometry(map: &Qcow2Map, size: u64, l1: Option<(u32, u64)>) -> Result<()> {
    let file = &map.m.file;
    match l1 {
        None => file.write_all_at(&size.to_be_bytes(), OFF_SIZE)?,
        Some((l1_size, l1_off)) => {
            // crypt_method (bytes 32..36) stays 0: encrypted images are refused at open.
            let mut b = [0u8; 24];
            b[..8].copy_from_slice(&size.to_be_bytes());
            b[12..16].copy_from_slice(&l1_size.to_be_bytes());
            b[16..24].copy_from_slice(&l1_off.to_be_bytes());
            file.write_all_at(&b, OFF_SIZE)?;
        }
    }
    file.sync()
}
