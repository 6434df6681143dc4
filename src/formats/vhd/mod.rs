//! VHD (Microsoft Virtual PC / Hyper-V generation 1 / Azure; QEMU's `vpc`): fixed, dynamic and
//! differencing disks.
//!
//! ```text
//!  fixed:        [ data ........................................ ][footer]
//!  dynamic/diff: [footer copy][dyn header][BAT][bitmap|block]...[footer]
//! ```
//!
//! The footer's disk size is read by the creator application's rule (`footer::virtual_size`).
//! Fixed disks have no magic at offset 0: the registry recognises them by their trailing footer
//! (`formats::detect`); QEMU probes them as raw.

mod check;
mod create;
mod dynamic;
pub mod footer;
pub mod parent;

use crate::error::{Error, Result};
use crate::format::{
    Below, BlockMap, CheckReport, CreateOpts, Extent, Format, ImageInfo, OpenCtx, Repair,
};
use crate::host::HostFile;
use footer::{DiskType, Footer, COOKIE, FOOTER_LEN};

pub struct Vpc;

impl Format for Vpc {
    fn name(&self) -> &'static str {
        "vpc"
    }
    fn aliases(&self) -> &'static [&'static str] {
        &["vhd"]
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(COOKIE)
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        let found = read_footer(&file)?;
        let f = found.footer;
        if f.disk_type == DiskType::Fixed {
            return Ok(Box::new(FixedMap::open(file, f, ctx.read_only)?));
        }
        Ok(Box::new(dynamic::DynMap::open(
            file,
            f,
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

/// The footer an image is read by, and what its two copies look like.
pub struct FoundFooter {
    pub footer: Footer,
    /// The copy at offset 0 (dynamic and differencing disks), if valid.
    pub head: Option<Footer>,
    /// The copy in the last 512 bytes, if valid.
    pub tail: Option<Footer>,
    /// Why a copy that should be there is not.
    pub problems: Vec<String>,
}

/// Read both footer copies. Offset 0 wins for dynamic disks (it is what QEMU reads, and the
/// tail copy moves on every allocation); a missing or damaged copy is reported, not fatal.
pub fn read_footer(file: &HostFile) -> Result<FoundFooter> {
    let len = file.len()?;
    if len < FOOTER_LEN as u64 {
        return Err(Error::corrupt(format!(
            "file of {len} bytes is too small for a VHD footer"
        )));
    }
    let mut b = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut b, 0)?;
    let head_has_cookie = b.starts_with(COOKIE);
    let head = Footer::parse(&b);
    file.read_exact_at(&mut b, len - FOOTER_LEN as u64)?;
    let tail = Footer::parse(&b);
    let mut problems = vec![];
    // A valid fixed footer at the end wins: a guest can write anything at offset 0 of a fixed
    // disk, including a dynamic disk's footer.
    let footer = match (&head, &tail) {
        (_, Ok(t)) if t.disk_type == DiskType::Fixed => t.clone(),
        (Ok(h), _) => h.clone(),
        (_, Ok(t)) => t.clone(),
        (Err(e), Err(_)) if head_has_cookie => return Err(Error::corrupt(e.to_string()).at(0)),
        (_, Err(e)) => return Err(Error::corrupt(e.to_string()).at(len - FOOTER_LEN as u64)),
    };
    let head = head.ok();
    let tail = tail.ok();
    if footer.disk_type != DiskType::Fixed {
        if head.as_ref() != Some(&footer) {
            problems.push("footer copy at offset 0 is missing or damaged".to_string());
        }
        if tail.as_ref() != Some(&footer) {
            problems.push("footer at the end of the file is missing or differs".to_string());
        }
    }
    Ok(FoundFooter {
        footer,
        head,
        tail,
        problems,
    })
}

/// Footer facts for `imgfs info`.
pub fn footer_details(f: &Footer) -> serde_json::Map<String, serde_json::Value> {
    let mut d = serde_json::Map::new();
    d.insert("disk_type".into(), f.disk_type.name().into());
    d.insert("creator_app".into(), f.creator().into());
    d.insert(
        "size_from".into(),
        if f.virtual_size() == f.chs_sectors() * footer::SECTOR && !f.uses_current_size() {
            "chs_geometry"
        } else {
            "current_size"
        }
        .into(),
    );
    d.insert("current_size".into(), f.current_size.into());
    d.insert(
        "geometry".into(),
        format!("{}/{}/{}", f.cylinders, f.heads, f.sectors).into(),
    );
    d.insert(
        "unique_id".into(),
        dynamic::uuid_string(&f.unique_id).into(),
    );
    d
}

/// A fixed disk: guest offset = host offset, the footer after the data.
pub struct FixedMap {
    file: HostFile,
    footer: Footer,
    size: u64,
    read_only: bool,
}

impl FixedMap {
    fn open(file: HostFile, footer: Footer, read_only: bool) -> Result<FixedMap> {
        let data = file.len()? - FOOTER_LEN as u64;
        let size = footer.virtual_size();
        if size > data {
            return Err(Error::corrupt(format!(
                "fixed VHD claims {size} bytes but holds only {data} bytes of data"
            )));
        }
        Ok(FixedMap {
            file,
            footer,
            size,
            read_only,
        })
    }
}

impl BlockMap for FixedMap {
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "vpc",
            virtual_size: self.size,
            cluster_size: footer::SECTOR,
            backing: None,
            details: footer_details(&self.footer),
        }
    }
    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        Ok(Extent::Data { host: off, len })
    }
    fn map_write(&self, off: u64, len: u64, _below: &dyn Below) -> Result<Extent> {
        if self.read_only {
            return Err(Error::read_only("VHD image is open read-only"));
        }
        Ok(Extent::Data { host: off, len })
    }
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        if self.read_only {
            return Err(Error::read_only("VHD image is open read-only"));
        }
        if unmap {
            self.file.punch_hole(off, len)?;
        } else {
            self.file.write_zeroes(off, len)?;
        }
        Ok(true)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync()
    }
    fn data_end(&self) -> Option<u64> {
        Some(self.size)
    }
}
