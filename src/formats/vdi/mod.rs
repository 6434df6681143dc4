//! VDI (VirtualBox's native format; QEMU's `vdi`): static (preallocated), dynamic and
//! differencing images.
//!
//! ```text
//!   [header 512][block map: u32 per block][block 0][block 1]...   (blocks in allocation order)
//! ```
//!
//! A differencing image names its parent only by UUID (VirtualBox keeps the link in its media
//! registry); the engine finds the parent among the images in the child's directory, or in
//! `--backing-dir`, by the identity this format reads from each candidate's header.

mod check;
mod create;
pub mod header;
mod map;

use crate::error::Result;
use crate::format::{BlockMap, CheckReport, CreateOpts, Format, OpenCtx, Repair};
use crate::host::HostFile;
use header::{Header, HEADER_LEN};

pub use header::build as build_header;
pub use map::bmap_bytes;

pub struct Vdi;

fn read_header(file: &HostFile) -> Result<Header> {
    let mut b = vec![0u8; HEADER_LEN];
    let n = file.read_at(&mut b, 0)?;
    b.truncate(n);
    Header::parse(&b, file.len()?)
}

impl Format for Vdi {
    fn name(&self) -> &'static str {
        "vdi"
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= HEADER_LEN && header::is_vdi(head)
    }
    fn identity(&self, head: &[u8]) -> Option<String> {
        let h = Header::parse(head.get(..HEADER_LEN)?, u64::MAX).ok()?;
        Some(header::uuid_string(&h.uuid_image))
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        let h = read_header(&file)?;
        Ok(Box::new(map::VdiMap::open(
            file,
            h,
            ctx.read_only,
            ctx.cache_size,
        )?))
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        let h = read_header(&file)?;
        check::check(file, h, repair)
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
}
