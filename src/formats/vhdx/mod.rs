//! VHDX (Microsoft "VHDX Format Specification v1.00"): dual headers, region table, metadata,
//! BAT with interleaved sector bitmaps, and a write-ahead metadata log.
//!
//! ```text
//!   [header section 1 MiB][log][metadata][BAT][payload blocks and sector bitmaps ...]
//! ```
//!
//! Every BAT or sector-bitmap change goes through the log: changed 4 KiB pages stay in memory
//! until a flush, which syncs the data, writes all of them as one log entry, syncs, and only
//! then writes the pages in place (their durability is covered by the next flush's first sync,
//! before the next entry moves the log tail past them).

mod bat;
mod bitmap;
mod check;
mod create;
mod header;
mod log;
mod map;
mod metadata;
mod resize;

use crate::error::Result;
use crate::format::{BlockMap, CheckReport, CreateOpts, Format, OpenCtx, Repair};
use crate::host::HostFile;

pub struct Vhdx;

impl Format for Vhdx {
    fn name(&self) -> &'static str {
        "vhdx"
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= 8 && &head[..8] == header::FILE_ID_SIGNATURE
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        Ok(Box::new(map::VhdxMap::open(
            file,
            ctx.read_only,
            ctx.cache_size,
        )?))
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        check::check(file, repair)
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
}
