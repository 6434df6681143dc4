//! VMDK (VMware): a text descriptor listing extents (sparse `KDMV` grain files, ESX `COWD` and
//! ESXi seSparse delta files, flat files, zero runs), embedded in a sparse extent or standalone;
//! split disks (2 GiB files), delta disks over a parent (`parentFileNameHint`, `parentCID`),
//! streamOptimized (compressed) extents.
//!
//! ```text
//!  guest:  | extent 0 (SPARSE a-s001) | extent 1 (SPARSE a-s002) | extent 2 (FLAT f 0) | ...
//!  file 0 = the opened file (descriptor or monolithic sparse); extent files 1.. opened through
//!  OpenCtx::open_sibling (confined by the policy) and named by Extent::InFile { file, .. }
//! ```

mod check;
pub mod cowd;
mod create;
pub mod descriptor;
mod flat;
pub mod ova;
pub mod sesparse;
pub mod sparse;
mod stream;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    BackingRef, Below, BlockMap, CheckReport, CreateOpts, Extent, Format, FormatStats, ImageInfo,
    OpenCtx, Repair,
};
use crate::host::HostFile;
use descriptor::{Access, Descriptor, Kind, NO_PARENT};
use flat::Flat;
use parking_lot::Mutex;
use sesparse::SeSparse;
use sparse::{FreeSector, Header, Sparse, SECTOR};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest disk accepted: 64 TiB.
pub const MAX_SECTORS: u64 = 1 << 37;

pub struct Vmdk;

impl Format for Vmdk {
    fn name(&self) -> &'static str {
        "vmdk"
    }
    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(sparse::MAGIC) || descriptor::is_descriptor(head)
    }
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>> {
        Ok(Box::new(VmdkMap::open(file, ctx)?))
    }
    fn check(&self, file: HostFile, repair: Repair) -> Result<CheckReport> {
        check::check(file, repair)
    }
    fn create(&self, file: &HostFile, opts: &CreateOpts) -> Result<()> {
        create::create(file, opts)
    }
}

enum Body {
    /// KDMV (hosted sparse, streamOptimized) or COWD (ESX vmfsSparse).
    Sparse(Box<Sparse>),
    /// ESXi seSparse: read-only.
    SeSparse(Box<SeSparse>),
    Flat(Flat),
    Zero,
}

struct Ext {
    /// First guest byte.
    start: u64,
    len: u64,
    access: Access,
    body: Body,
    /// Which descriptor extent line this is, and what its file turned out to be (for `info`).
    line: usize,
    kind: &'static str,
}

/// Where the descriptor text lives, for the CID update on the first write.
struct DescLoc {
    file: HostFile,
    offset: u64,
    /// Bytes available (the embedded descriptor's sectors); the whole file when standalone.
    room: Option<u64>,
}

pub struct VmdkMap {
    desc: Descriptor,
    desc_loc: DescLoc,
    files: Vec<HostFile>,
    exts: Vec<Ext>,
    size: u64,
    read_only: bool,
    /// Why the format serves this image read-only whatever the mount asked (a compressed
    /// streamOptimized or an seSparse extent), if it does.
    format_read_only: Option<&'static str>,
    cid_written: AtomicBool,
    cid_lock: Mutex<u32>,
}

/// Read a whole small file (a descriptor), bounded.
fn read_text(file: &HostFile, off: u64, len: u64) -> Result<Vec<u8>> {
    if len > descriptor::MAX_DESCRIPTOR {
        return Err(Error::corrupt("VMDK descriptor larger than 1 MiB"));
    }
    let mut b = vec![0u8; len as usize];
    let n = file.read_at(&mut b, off)?;
    b.truncate(n);
    Ok(b)
}

/// The header of a sparse extent file (the footer's for a stream with the directory at the end).
pub fn read_sparse_header(file: &HostFile) -> Result<Header> {
    let mut b = [0u8; 512];
    file.read_exact_at(&mut b, 0)
        .map_err(|_| Error::corrupt("VMDK sparse extent shorter than its header"))?;
    stream::effective_header(file, Header::parse(&b)?)
}

/// The header of a grain file named by a `SPARSE` or `VMFSSPARSE` line, told apart by its
/// magic as QEMU does: KDMV, or ESX COWD translated to the same shape (with its free-sector
/// field). Also what the file is, for `info`.
pub fn read_grain_header(file: &HostFile) -> Result<(Header, Option<FreeSector>, &'static str)> {
    let mut b = [0u8; cowd::HEADER_LEN];
    let n = file.read_at(&mut b, 0)?;
    if !b[..n].starts_with(cowd::MAGIC) {
        let h = read_sparse_header(file)?;
        let kind = if h.compressed() {
            "KDMV stream"
        } else {
            "KDMV"
        };
        return Ok((h, None, kind));
    }
    if n < cowd::HEADER_LEN {
        return Err(Error::corrupt("COWD extent shorter than its header"));
    }
    let h = cowd::CowdHeader::parse(&b)?;
    // Rewritten only once imgfs allocates past both the field and the file's end: a session
    // without writes leaves the header alone.
    let recorded = (h.free_sector as u64).max(file.len()?.div_ceil(SECTOR));
    let free = FreeSector {
        at: cowd::FREE_SECTOR_AT,
        recorded: std::sync::atomic::AtomicU64::new(recorded),
    };
    Ok((h.as_sparse(), Some(free), "COWD"))
}

/// The descriptor embedded in a sparse extent, if any.
fn embedded_descriptor(file: &HostFile, h: &Header) -> Result<Option<Descriptor>> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let b = read_text(file, h.desc_offset * SECTOR, h.desc_size * SECTOR)?;
    Descriptor::parse(&b).map(Some)
}

impl VmdkMap {
    fn open(file: HostFile, ctx: &OpenCtx) -> Result<VmdkMap> {
        let mut head = [0u8; 8];
        let n = file.read_at(&mut head, 0)?;
        let head = &head[..n];
        if head.starts_with(cowd::MAGIC) || head == sesparse::CONST_MAGIC.to_le_bytes() {
            // QEMU opens a bare COWD file but then finds no CID in it and fails; a delta's
            // parent is named only in its descriptor.
            return Err(Error::unsupported(
                "an ESX delta extent (COWD / seSparse) by itself: open the descriptor .vmdk \
                 that names it (and its parent)",
            ));
        }
        let per_cache = |n: usize| ctx.cache_size / n.max(1) as u64;
        let (desc, desc_loc, exts, files) = if head.starts_with(sparse::MAGIC) {
            // A monolithic sparse file: the extent is the file itself; the embedded descriptor
            // gives the CID, parent and DDB.
            let h = read_sparse_header(&file)?;
            let desc = embedded_descriptor(&file, &h)?.unwrap_or_else(|| Descriptor {
                text: String::new(),
                cid: 0,
                parent_cid: NO_PARENT,
                create_type: "monolithicSparse".into(),
                parent_hint: None,
                extents: Vec::new(),
                ddb: Vec::new(),
            });
            let loc = DescLoc {
                file: file.clone(),
                offset: h.desc_offset * SECTOR,
                room: Some(h.desc_size * SECTOR),
            };
            let len = h.capacity * SECTOR;
            let kind = if h.compressed() {
                "KDMV stream"
            } else {
                "KDMV"
            };
            let sp = Sparse::open(0, file.clone(), (h, None), len, ctx.cache_size)?;
            let ext = Ext {
                start: 0,
                len,
                access: Access::Rw,
                body: Body::Sparse(Box::new(sp)),
                line: 0,
                kind,
            };
            (desc, loc, vec![ext], vec![file.clone()])
        } else {
            let len = file.len()?;
            let desc = Descriptor::parse(&read_text(&file, 0, len)?)?;
            let loc = DescLoc {
                file: file.clone(),
                offset: 0,
                room: None,
            };
            let (exts, files) = Self::open_extents(&desc, &file, ctx, per_cache)?;
            (desc, loc, exts, files)
        };
        let size = exts.last().map_or(0, |e| e.start + e.len);
        let format_read_only = exts.iter().find_map(|e| match &e.body {
            Body::Sparse(s) if s.hdr.compressed() => {
                Some("streamOptimized VMDK (compressed grains)")
            }
            Body::SeSparse(_) => {
                Some("VMDK seSparse extent (ESXi snapshot delta; QEMU does not write these either)")
            }
            _ => None,
        });
        if let Some(why) = format_read_only.filter(|_| !ctx.read_only) {
            log::warn!("{}: {why}: served read-only", file.path().display());
        }
        Ok(VmdkMap {
            cid_lock: Mutex::new(desc.cid),
            desc,
            desc_loc,
            files,
            exts,
            size,
            read_only: ctx.read_only || format_read_only.is_some(),
            format_read_only,
            cid_written: AtomicBool::new(false),
        })
    }

    /// Open every extent a standalone descriptor lists; file 0 is the descriptor itself.
    fn open_extents(
        desc: &Descriptor,
        file: &HostFile,
        ctx: &OpenCtx,
        per_cache: impl Fn(usize) -> u64,
    ) -> Result<(Vec<Ext>, Vec<HostFile>)> {
        desc.sectors()?;
        let mut files = vec![file.clone()];
        let mut by_name: HashMap<&str, u32> = HashMap::new();
        let mut exts = Vec::new();
        let mut start = 0u64;
        let sparse_count = desc
            .extents
            .iter()
            .filter(|e| matches!(e.kind, Kind::Sparse | Kind::SeSparse))
            .count();
        for (line_no, line) in desc.extents.iter().enumerate() {
            let len = line.sectors * SECTOR;
            if len == 0 {
                continue;
            }
            let file_no = if line.kind == Kind::Zero {
                0
            } else if let Some(&n) = by_name.get(line.file.as_str()) {
                n
            } else {
                let f = (ctx.open_sibling)(&line.file).map_err(|e| {
                    Error::new(e.kind(), format!("VMDK extent {:?}: {e}", line.file))
                })?;
                files.push(f);
                let n = (files.len() - 1) as u32;
                by_name.insert(&line.file, n);
                n
            };
            let f = &files[file_no as usize];
            let fits = |capacity: u64| {
                if capacity < line.sectors {
                    return Err(Error::corrupt(format!(
                        "VMDK extent {:?} holds {capacity} sectors but the descriptor gives it {}",
                        line.file, line.sectors
                    ))
                    .in_file(f.path()));
                }
                Ok(())
            };
            let (body, kind) = match line.kind {
                Kind::Zero => (Body::Zero, "zero"),
                Kind::Flat => (Body::Flat(Flat::new(file_no, line.offset, len)?), "flat"),
                Kind::Sparse => {
                    let (h, free, kind) = read_grain_header(f).map_err(|e| e.in_file(f.path()))?;
                    fits(h.capacity)?;
                    let sp =
                        Sparse::open(file_no, f.clone(), (h, free), len, per_cache(sparse_count))
                            .map_err(|e| e.in_file(f.path()))?;
                    (Body::Sparse(Box::new(sp)), kind)
                }
                Kind::SeSparse => {
                    let se = SeSparse::open(file_no, f.clone(), per_cache(sparse_count))
                        .map_err(|e| e.in_file(f.path()))?;
                    fits(se.hdr.capacity)?;
                    (Body::SeSparse(Box::new(se)), "seSparse")
                }
            };
            exts.push(Ext {
                start,
                len,
                access: line.access,
                body,
                line: line_no,
                kind,
            });
            start += len;
        }
        Ok((exts, files))
    }

    /// The extent holding guest offset `off` and the bytes left in it from there.
    fn ext_at(&self, off: u64) -> Result<(&Ext, u64, u64)> {
        let i = self.exts.partition_point(|e| e.start + e.len <= off);
        let e = self
            .exts
            .get(i)
            .ok_or_else(|| Error::invalid(format!("offset {off:#x} past the VMDK's extents")))?;
        let rel = off - e.start;
        if e.access == Access::NoAccess {
            return Err(Error::new(
                ErrorKind::Permission,
                "VMDK extent is marked NOACCESS",
            ));
        }
        Ok((e, rel, e.len - rel))
    }

    fn check_write(&self, e: &Ext) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only(match self.format_read_only {
                Some(why) => format!("{why}: served read-only"),
                None => "VMDK image is open read-only".into(),
            }));
        }
        if e.access != Access::Rw {
            return Err(Error::read_only("VMDK extent is marked RDONLY"));
        }
        Ok(())
    }

    /// On the first write of a session the CID changes (as VMware does), so a delta disk made
    /// against this one is refused afterwards.
    fn touch_cid(&self) -> Result<()> {
        if self.cid_written.load(Ordering::Acquire) || self.desc.text.is_empty() {
            return Ok(());
        }
        let mut cid = self.cid_lock.lock();
        if self.cid_written.load(Ordering::Acquire) {
            return Ok(());
        }
        let new = new_cid(*cid);
        let mut text = self.desc.with_cid(new);
        while self.desc_loc.room.is_some() && text.len() < self.desc.text.len() {
            text.push('\0'); // an embedded CID written with more digits: no stale tail
        }
        if self.desc_loc.room.is_some_and(|r| text.len() as u64 > r) {
            return Err(Error::corrupt(
                "VMDK descriptor has no room for its new CID",
            ));
        }
        let d = &self.desc_loc;
        d.file.write_all_at(text.as_bytes(), d.offset)?;
        if d.room.is_none() {
            d.file.set_len(text.len() as u64)?;
        }
        *cid = new;
        self.cid_written.store(true, Ordering::Release);
        Ok(())
    }
}

/// A fresh CID, different from `old`.
pub fn new_cid(old: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(old);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    h.write_u64(t);
    let c = h.finish() as u32;
    if c == old || c == NO_PARENT {
        c.wrapping_add(1) & 0x7fff_ffff
    } else {
        c
    }
}

impl BlockMap for VmdkMap {
    fn info(&self) -> ImageInfo {
        let d = &self.desc;
        let mut m = serde_json::Map::new();
        m.insert("create_type".into(), d.create_type.clone().into());
        m.insert("cid".into(), (*self.cid_lock.lock()).into());
        m.insert("parent_cid".into(), d.parent_cid.into());
        for (k, name) in [
            ("ddb.adapterType", "adapter_type"),
            ("ddb.virtualHWVersion", "hw_version"),
        ] {
            if let Some(v) = d.ddb(k) {
                m.insert(name.into(), v.into());
            }
        }
        let lines: Vec<serde_json::Value> = d
            .extents
            .iter()
            .enumerate()
            .map(|(i, e)| {
                // What the file turned out to be (KDMV, COWD, seSparse, flat, zero).
                let kind = self.exts.iter().find(|x| x.line == i).map(|x| x.kind);
                serde_json::json!({
                    "access": format!("{:?}", e.access).to_uppercase(),
                    "sectors": e.sectors, "type": e.type_name, "file": e.file,
                    "offset": e.offset, "format": kind,
                })
            })
            .collect();
        m.insert("extents".into(), lines.into());
        let mut grain = 0;
        if let Some(s) = self.exts.iter().find_map(|e| match &e.body {
            Body::SeSparse(s) => Some(s),
            _ => None,
        }) {
            grain = s.grain_bytes();
            m.insert("grain_size".into(), grain.into());
        }
        if let Some(s) = self.exts.iter().find_map(|e| match &e.body {
            Body::Sparse(s) => Some(s),
            _ => None,
        }) {
            let h = &s.hdr;
            grain = h.grain_bytes();
            m.insert("version".into(), h.version.into());
            m.insert("flags".into(), h.flags.into());
            m.insert("grain_size".into(), grain.into());
            m.insert("compressed".into(), h.compressed().into());
            m.insert("zeroed_grain".into(), h.zero_grain().into());
            m.insert("redundant_gd".into(), h.has_rgd().into());
        }
        ImageInfo {
            format: "vmdk",
            virtual_size: self.size,
            cluster_size: if grain > 0 { grain } else { SECTOR },
            backing: d.parent_hint.as_ref().map(|p| BackingRef {
                name: p.clone(),
                format: Some("vmdk".into()),
            }),
            details: m,
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        let (e, rel, left) = self.ext_at(off)?;
        let len = len.min(left);
        match &e.body {
            Body::Zero => Ok(Extent::Zero { len }),
            Body::Flat(f) => Ok(f.map(rel, len)),
            Body::Sparse(s) => s.map_read(rel, len).map_err(|err| err.at(off)),
            Body::SeSparse(s) => s.map_read(rel, len).map_err(|err| err.at(off)),
        }
    }

    fn read_format(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let (e, rel, _) = self.ext_at(off)?;
        match &e.body {
            Body::Sparse(s) => s.read_compressed(rel, buf),
            _ => Err(Error::corrupt(
                "VMDK format-served read outside a sparse extent",
            )),
        }
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        let (e, rel, left) = self.ext_at(off)?;
        self.check_write(e)?;
        self.touch_cid()?;
        let len = len.min(left);
        match &e.body {
            Body::Zero => Err(Error::read_only("VMDK ZERO extents cannot be written")),
            Body::Flat(f) => Ok(f.map(rel, len)),
            Body::Sparse(s) => s.map_write(rel, len, off, below),
            Body::SeSparse(_) => Err(Error::read_only("VMDK seSparse extents are read-only")),
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, _below: &dyn Below) -> Result<bool> {
        // Only a run inside one sparse extent is expressed in metadata.
        let (e, rel, left) = self.ext_at(off)?;
        self.check_write(e)?;
        match &e.body {
            Body::Sparse(s) if len <= left => {
                self.touch_cid()?;
                s.write_zeroes(rel, len, unmap, self.desc.parent_hint.is_some())
            }
            _ => Ok(false),
        }
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        for e in &self.exts {
            if let Body::Sparse(s) = &e.body {
                s.flush()?;
            }
        }
        // Flat extent files and the descriptor (its CID).
        for f in &self.files {
            f.sync()?;
        }
        Ok(())
    }

    fn check_backing(&self, parent: &ImageInfo) -> Result<()> {
        if parent.format != "vmdk" {
            return Ok(());
        }
        let Some(pcid) = parent.details.get("cid").and_then(|v| v.as_u64()) else {
            return Ok(());
        };
        if pcid as u32 != self.desc.parent_cid {
            return Err(Error::corrupt(format!(
                "VMDK delta disk was made against parent CID {:08x}, but its parent now has CID \
                 {pcid:08x}: the parent changed since the delta was created",
                self.desc.parent_cid
            )));
        }
        Ok(())
    }

    fn extent_file(&self, file: u32) -> Option<HostFile> {
        self.files.get(file as usize).cloned()
    }

    fn writable(&self) -> bool {
        self.format_read_only.is_none()
    }

    fn stats(&self) -> FormatStats {
        let mut st = FormatStats::default();
        for e in &self.exts {
            let c = match &e.body {
                Body::Sparse(s) => {
                    st.clusters_allocated += s.grains_allocated.load(Ordering::Relaxed);
                    s.cache_stats()
                }
                Body::SeSparse(s) => s.cache_stats(),
                _ => continue,
            };
            st.cache.hits += c.hits;
            st.cache.misses += c.misses;
            st.cache.evictions += c.evictions;
            st.cache.writebacks += c.writebacks;
        }
        st
    }
}
