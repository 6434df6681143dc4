//! raw: guest offset = host offset. Discard punches holes; SEEK_DATA/SEEK_HOLE come from the host.

use crate::error::{Error, Result};
use crate::format::{Below, BlockMap, CreateOpts, Extent, Format, ImageInfo, OpenCtx};
use crate::host::HostFile;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Raw;

impl Format for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn probe(&self, _head: &[u8]) -> bool {
        true
    }
    fn open(&self, file: HostFile, _ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        let size = file.len()?;
        Ok(Box::new(RawMap {
            file,
            size: AtomicU64::new(size),
        }))
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        if let Some(k) = opts.options.keys().find(|k| k.as_str() != "preallocation") {
            return Err(Error::invalid(format!("raw: unknown option {k:?}")));
        }
        if opts.backing.is_some() {
            return Err(Error::invalid("raw images cannot have a backing file"));
        }
        file.set_len(opts.size)?;
        match opts.options.get("preallocation").map(String::as_str) {
            None | Some("off") => Ok(()),
            Some("full") | Some("falloc") => file
                .write_zeroes_reporting(0, opts.size, |done| opts.progress.update(done, opts.size)),
            Some(other) => Err(Error::invalid(format!(
                "raw: preallocation={other} not supported (off, falloc, full)"
            ))),
        }
    }
}

struct RawMap {
    file: HostFile,
    size: AtomicU64,
}

impl BlockMap for RawMap {
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw",
            virtual_size: self.size.load(Ordering::Acquire),
            cluster_size: 512,
            backing: None,
            details: Default::default(),
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        Ok(Extent::Data { host: off, len })
    }

    fn map_status(&self, off: u64, len: u64) -> Result<Extent> {
        let end = off + len;
        match self.file.seek_data(off)? {
            None => Ok(Extent::Zero { len }),
            Some(d) if d > off => Ok(Extent::Zero {
                len: (d - off).min(len),
            }),
            Some(_) => {
                let hole = self.file.seek_hole(off)?.clamp(off + 1, end);
                Ok(Extent::Data {
                    host: off,
                    len: hole - off,
                })
            }
        }
    }

    fn map_write(&self, off: u64, len: u64, _below: &dyn Below) -> Result<Extent> {
        Ok(Extent::Data { host: off, len })
    }

    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool, _below: &dyn Below) -> Result<bool> {
        // A hole reads as zeros, so zeroing and discarding are the same here.
        self.file.punch_hole(off, len)?;
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    /// The file is the disk: its length is the size (a shrink cuts the tail off).
    fn resize(&self, new_size: u64) -> Result<()> {
        self.file.set_len(new_size)?;
        self.file.sync()?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn can_shrink(&self) -> bool {
        true
    }
}
