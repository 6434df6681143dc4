//! Create an empty qcow v1 image as qemu-img does: the header, the backing file name right
//! after it, then the zeroed L1 table (8-byte aligned, padded to whole sectors). Without a
//! backing file clusters are 4 KiB with 512-entry L2 tables; with one, 512-byte clusters and
//! 4096-entry L2 tables (so partial writes need little copy-on-write).

use super::header::{Header, HEADER_LEN, MAX_BACKING_NAME};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    if let Some(k) = opts.options.keys().next() {
        return Err(Error::invalid(format!("qcow: unknown option {k:?}")));
    }
    if opts.size < 512 || !opts.size.is_multiple_of(512) {
        return Err(Error::invalid(format!(
            "qcow: size {} must be a non-zero multiple of 512",
            opts.size
        )));
    }
    let name = opts.backing.as_ref().map(|b| b.name.as_bytes().to_vec());
    let name = name.unwrap_or_default();
    if name.len() > MAX_BACKING_NAME as usize {
        return Err(Error::invalid("qcow: backing file name too long"));
    }
    let (cluster_bits, l2_bits) = if opts.backing.is_some() {
        (9, 12)
    } else {
        (12, 9)
    };
    let l1_table_offset = ((HEADER_LEN + name.len()) as u64).div_ceil(8) * 8;
    let mut h = Header {
        backing_file_offset: 0,
        backing_file_size: 0,
        mtime: 0,
        size: opts.size,
        cluster_bits,
        l2_bits,
        crypt_method: 0,
        l1_table_offset,
    };
    if opts.backing.is_some() {
        if name.is_empty() {
            return Err(Error::invalid("qcow: empty backing file name"));
        }
        h.backing_file_offset = HEADER_LEN as u64;
        h.backing_file_size = name.len() as u32;
    }
    let l1_bytes = h.l1_entries() * 8;
    if l1_bytes > super::header::MAX_L1_BYTES {
        return Err(Error::invalid("qcow: image too large"));
    }
    let mut head = h.to_bytes().to_vec();
    head.extend_from_slice(&name);
    file.set_len(0)?;
    file.write_all_at(&head, 0)?;
    file.set_len(l1_table_offset + l1_bytes.div_ceil(512) * 512)?;
    // Validate what was written the way open will.
    Header::parse(&head, file.len()?)?;
    file.sync()
}
