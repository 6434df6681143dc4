//! Create an empty QED image the way qemu-img does: one header cluster (the backing file name
//! right after the 64-byte header), then a zeroed L1 table.
//!
//! ```text
//!  0: header | backing name | ...pad... || cluster_size: L1 (table_size clusters, zeros)
//! ```

use super::header::{self, Header, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, HEADER_LEN, MAGIC};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;

const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
const DEFAULT_TABLE_SIZE: u32 = 4;

fn parse_size(key: &str, v: &str) -> Result<u32> {
    crate::options::opt_size_u32("qed", key, v)
}

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    let mut cluster_size = DEFAULT_CLUSTER_SIZE;
    let mut table_size = DEFAULT_TABLE_SIZE;
    for (k, v) in &opts.options {
        match k.as_str() {
            "cluster_size" => cluster_size = parse_size(k, v)?,
            "table_size" => table_size = parse_size(k, v)?,
            _ => return Err(Error::invalid(format!("qed: unknown option {k:?}"))),
        }
    }
    if !header::is_cluster_size_valid(cluster_size) {
        return Err(Error::invalid(
            "qed: cluster_size must be a power of two in [4 KiB, 64 MiB]",
        ));
    }
    if !header::is_table_size_valid(table_size) {
        return Err(Error::invalid(
            "qed: table_size must be a power of two in [1, 16]",
        ));
    }
    if table_size == 1 {
        // Valid per the spec, but QEMU's table offset check refuses every such image.
        return Err(Error::invalid(
            "qed: table_size=1 makes images QEMU cannot open; use 2 or more",
        ));
    }
    let table_bytes = cluster_size as u64 * table_size as u64;
    if table_bytes > header::MAX_TABLE_BYTES {
        return Err(Error::invalid(format!(
            "qed: tables of {table_bytes} bytes are too large"
        )));
    }
    if !opts.size.is_multiple_of(512)
        || opts.size > header::qemu_max_image_size(cluster_size, table_size)
    {
        return Err(Error::invalid(format!(
            "qed: size {} must be a multiple of 512 and at most {} (QEMU's limit for this \
             cluster and table size)",
            opts.size,
            header::qemu_max_image_size(cluster_size, table_size)
        )));
    }
    let mut h = Header {
        cluster_size,
        table_size,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster_size as u64,
        image_size: opts.size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let mut name_bytes = Vec::new();
    if let Some(b) = &opts.backing {
        name_bytes = b.name.as_bytes().to_vec();
        if name_bytes.is_empty()
            || HEADER_LEN + name_bytes.len() > cluster_size as usize
            || name_bytes.len() > header::MAX_BACKING_NAME as usize
        {
            return Err(Error::invalid(
                "qed: backing file name is empty or does not fit in the header",
            ));
        }
        h.features |= F_BACKING_FILE;
        h.backing_filename_offset = HEADER_LEN as u32;
        h.backing_filename_size = name_bytes.len() as u32;
        if b.format.as_deref() == Some("raw") {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    debug_assert_eq!(&h.to_bytes()[..4], MAGIC);
    let mut head = h.to_bytes().to_vec();
    head.extend_from_slice(&name_bytes);
    file.set_len(0)?;
    file.write_all_at(&head, 0)?;
    file.set_len(h.l1_table_offset + table_bytes)?;
    file.sync()
}
