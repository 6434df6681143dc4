//! `imgfs create -f vdi -o static=on|off IMAGE SIZE`: VirtualBox's layout with 1 MiB blocks
//! (the only size QEMU reads). A static image maps every block in order and reserves the
//! file's full length (sparse on the host, as QEMU makes it). Block data starts on a 1 MiB
//! boundary, as in VirtualBox's images.

use super::header::{self, TYPE_DYNAMIC, TYPE_STATIC};
use super::map::{bmap_bytes, FREE};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;
use crate::options::opt_bool;

const BLOCK_SIZE: u32 = 1 << 20;
/// Where block data starts: VirtualBox's alignment (`VDI_DATA_ALIGN`).
const DATA_ALIGN: u64 = 1 << 20;

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
    let mut h = header::build(kind, opts.size, BLOCK_SIZE, blocks, allocated, ids);
    // Block data on a 1 MiB boundary, as VirtualBox places it (QEMU puts it right after the
    // map, 512 bytes off a page boundary, which makes every 4 KiB guest write a
    // read-modify-write of two host pages: docs/performance.md). QEMU reads any sector-aligned
    // data offset.
    let data = (header::HEADER_LEN as u64 + bmap_bytes(blocks)).next_multiple_of(DATA_ALIGN);
    h[0x158..0x15c].copy_from_slice(&(data as u32).to_le_bytes());
    let bmap: Vec<u8> = (0..blocks)
        .flat_map(|i| if is_static { i } else { FREE }.to_le_bytes())
        .chain(std::iter::repeat(0xff))
        .take(bmap_bytes(blocks) as usize)
        .collect();
    file.write_all_at(&h, 0)?;
    file.write_all_at(&bmap, header::HEADER_LEN as u64)?;
    // The file reaches the data area (sparse), as VirtualBox makes it; a static image holds
    // every block.
    let blocks_held = if is_static { blocks as u64 } else { 0 };
    file.set_len(data + blocks_held * BLOCK_SIZE as u64)
}
