//! `imgfs create -f vdi -o static=on|off IMAGE SIZE`: VirtualBox's layout with 1 MiB blocks
//! (the only size QEMU reads). A static image maps every block in order and reserves the
//! file's full length (sparse on the host, as QEMU makes it).

use super::header::{self, TYPE_DYNAMIC, TYPE_STATIC};
use super::map::{bmap_bytes, FREE};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;
use crate::options::opt_bool;

const BLOCK_SIZE: u32 = 1 << 20;

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    let mut is_static = false;
    for (k, v) in &opts.options {
        match k.as_str() {
            "static" => is_static = opt_bool("vdi", k, v)?,
            _ => return Err(Error::invalid(format!("vdi: unknown option {k:?}"))),
        }
    }
    if opts.backing.is_some() {
        return Err(Error::invalid(
            "vdi: differencing images are made by VirtualBox (the link lives in its registry); \
             imgfs reads and writes them but does not create them",
        ));
    }
    let blocks = opts.size.div_ceil(BLOCK_SIZE as u64);
    if blocks > header::MAX_BLOCKS as u64 {
        return Err(Error::invalid(format!(
            "vdi: disk size {} is too large",
            opts.size
        )));
    }
    let blocks = blocks as u32;
    let ids = [
        uuid::Uuid::new_v4().to_bytes_le(),
        uuid::Uuid::new_v4().to_bytes_le(),
        [0; 16],
        [0; 16],
    ];
    let (kind, allocated) = if is_static {
        (TYPE_STATIC, blocks)
    } else {
        (TYPE_DYNAMIC, 0)
    };
    let h = header::build(kind, opts.size, BLOCK_SIZE, blocks, allocated, ids);
    let bmap: Vec<u8> = (0..blocks)
        .flat_map(|i| if is_static { i } else { FREE }.to_le_bytes())
        .chain(std::iter::repeat(0xff))
        .take(bmap_bytes(blocks) as usize)
        .collect();
    file.write_all_at(&h, 0)?;
    file.write_all_at(&bmap, header::HEADER_LEN as u64)?;
    if is_static {
        let end = header::HEADER_LEN as u64 + bmap.len() as u64 + blocks as u64 * BLOCK_SIZE as u64;
        file.set_len(end)?;
    }
    Ok(())
}
