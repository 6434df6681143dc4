//! The engine. Formats describe where guest bytes live (`BlockMap` -> `Extent`); the engine does
//! the guest-data I/O itself, follows backing chains, and enforces the safety rules that apply to
//! every format (read-only, raw-magic promotion, degrade-on-corruption).
//!
//! ```text
//!   read_at(off, len):  map_read -> Data{host}  -> pread data file
//!                                -> InFile{file, host} -> pread the format's file number `file`
//!                                -> Zero        -> fill zeros
//!                                -> Backing     -> backing.read_at (zeros past its end)
//!                                -> Format      -> map.read_format (compressed clusters)
//!   write_at(off, buf): map_write (allocates, fills the rest of the cluster) -> pwrite
//! ```

use crate::error::{Error, ErrorKind, Result};
use crate::formats;
use crate::host::HostFile;
use crate::lock::{self, LockMode};
use crate::policy::resolve_named_file;
use std::path::{Path, PathBuf};

pub use crate::format::{
    BackingRef, Below, BlockMap, CheckReport, CreateOpts, Extent, Format, FormatStats, ImageInfo,
    NoBelow, OpenCtx, Repair, SnapshotInfo,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use crate::format::DEFAULT_CACHE_SIZE;
pub const DEFAULT_MAX_CHAIN: usize = 16;

#[derive(Debug, Clone)]
pub struct OpenOpts {
    pub read_only: bool,
    /// Format given by the user; None probes.
    pub format: Option<String>,
    pub cache_size: u64,
    /// Allow backing / data files outside the image's directory.
    pub allow_backing_outside: bool,
    pub max_chain: usize,
    /// Take QEMU-compatible OFD locks.
    pub lock: bool,
    /// Where to look for a parent named only by its UUID (VirtualBox differencing VDIs); the
    /// child's own directory when None.
    pub backing_dir: Option<PathBuf>,
    /// Files a format names (extents, data files) already open, by resolved path: the crash
    /// simulator serves multi-file images from `FaultFile`s this way.
    pub preopened: Preopened,
}

/// Host files handed to `Image::open` instead of opening these paths (see `OpenOpts`).
#[derive(Clone, Default)]
pub struct Preopened(pub Option<Arc<std::collections::HashMap<PathBuf, HostFile>>>);

impl std::fmt::Debug for Preopened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.as_ref().map_or(0, |m| m.len());
        write!(f, "Preopened({n} files)")
    }
}

impl Default for OpenOpts {
    fn default() -> Self {
        OpenOpts {
            read_only: false,
            format: None,
            cache_size: DEFAULT_CACHE_SIZE,
            allow_backing_outside: false,
            max_chain: DEFAULT_MAX_CHAIN,
            lock: true,
            backing_dir: None,
            preopened: Preopened::default(),
        }
    }
}

/// Per-image I/O counters for `imgfs stats`.
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub discards: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_ns_total: AtomicU64,
    pub flush_ns_max: AtomicU64,
    pub errors: AtomicU64,
}

/// One run of a planned read (`Image::read_plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPiece {
    /// `len` bytes of the open host file `fd` at `off` (if the file ends first, the reader
    /// falls back to `Image::read_at`, which knows whether that means zeros or corruption).
    Host {
        fd: std::os::fd::RawFd,
        off: u64,
        len: usize,
    },
    /// `len` zero bytes.
    Zero(usize),
}

/// Append a piece to a read plan, merging it into the last one when they are contiguous.
fn push_piece(plan: &mut Vec<ReadPiece>, piece: ReadPiece) {
    match (plan.last_mut(), piece) {
        (
            Some(ReadPiece::Host {
                fd: f,
                off: o,
                len: l,
            }),
            ReadPiece::Host {
                fd: g,
                off: h,
                len: m,
            },
        ) if *f == g && *o + *l as u64 == h => *l += m,
        (Some(ReadPiece::Zero(l)), ReadPiece::Zero(m)) => *l += m,
        (_, p) => plan.push(p),
    }
}

/// An open image with its backing chain: what the FUSE layer reads and writes.
pub struct Image {
    path: PathBuf,
    file: HostFile,
    data: HostFile,
    map: Box<dyn BlockMap>,
    format: &'static str,
    backing: Option<Arc<Image>>,
    read_only: bool,
    /// Raw image whose format was probed: refuse writes that would give it an image magic.
    probed_raw: bool,
    /// Set when a corrupt structure was found at runtime: no further writes.
    degraded: AtomicBool,
    /// Set when a write, discard or flush failed part-way (host I/O error, no space): metadata
    /// may not have reached disk as the format believes, so close writes back what it can but
    /// leaves the dirty / need-check / log marks for the next open to repair.
    unclean: AtomicBool,
    closed: AtomicBool,
    /// Virtual size; grows online (`resize`), never shrinks while open for I/O.
    size: AtomicU64,
    /// Serialises resizes.
    resizing: parking_lot::Mutex<()>,
    granule: u64,
    pub stats: IoStats,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}, {})", self.path.display(), self.format)
    }
}

impl Image {
    /// Open an image file and its backing chain.
    pub fn open(path: &Path, opts: &OpenOpts) -> Result<Image> {
        Self::open_at_depth(path, opts, 0)
    }

    /// Open an image file, or each disk of an OVA appliance (a tar archive of VMDKs, served
    /// read-only from inside it) when the format is not forced.
    pub fn open_all(path: &Path, opts: &OpenOpts) -> Result<Vec<Image>> {
        use crate::formats::vmdk::ova;
        let file = HostFile::open(path, false)?;
        let mut head = [0u8; 512];
        let n = file.read_at(&mut head, 0)?;
        if opts.format.is_some() || !ova::is_tar(&head[..n]) {
            drop(file);
            return Ok(vec![Self::open(path, opts)?]);
        }
        if opts.lock {
            lock::acquire(&file, LockMode::for_access(false))?;
        }
        let disks = ova::disks(&file).map_err(|e| e.in_file(path))?;
        if disks.is_empty() {
            return Err(Error::invalid("OVA archive holds no .vmdk disk").in_file(path));
        }
        let member_opts = OpenOpts {
            read_only: true,
            format: Some("vmdk".into()),
            lock: false,
            ..opts.clone()
        };
        disks
            .iter()
            .map(|m| {
                Self::open_host(ova::member_file(&file, m), &member_opts).map_err(|e| {
                    Error::new(e.kind(), format!("OVA member {}: {e}", m.name)).in_file(path)
                })
            })
            .collect()
    }

    fn open_at_depth(path: &Path, opts: &OpenOpts, depth: usize) -> Result<Image> {
        let file = HostFile::open(path, !opts.read_only)?;
        if opts.lock {
            lock::acquire(&file, LockMode::for_access(!opts.read_only))?;
        }
        Self::open_host_at_depth(file, opts, depth)
    }

    /// Open an image on an already opened host file (used by crash tests with `FaultFile`).
    /// Backing and data files are still looked up beside `file.path()`.
    pub fn open_host(file: HostFile, opts: &OpenOpts) -> Result<Image> {
        Self::open_host_at_depth(file, opts, 0)
    }

    fn open_host_at_depth(file: HostFile, opts: &OpenOpts, depth: usize) -> Result<Image> {
        let path = &file.path().to_path_buf();
        let (format, probed) = match &opts.format {
            Some(name) => (formats::by_name(name).map_err(|e| e.in_file(path))?, false),
            // Refuses containers imgfs cannot serve (VMDK, VDI, ...) rather than exposing them as raw.
            None => (formats::detect_file(&file)?, true),
        };
        let dir = image_dir(path);
        let open_sibling = |name: &str| -> Result<HostFile> {
            let p = resolve_named_file(&dir, name, opts.allow_backing_outside)
                .map_err(|e| e.in_file(path))?;
            if let Some(f) = opts.preopened.0.as_ref().and_then(|m| m.get(&p)) {
                return Ok(f.clone());
            }
            let f = HostFile::open(&p, !opts.read_only)?;
            if opts.lock {
                lock::acquire(&f, LockMode::for_access(!opts.read_only))?;
            }
            Ok(f)
        };
        let ctx = OpenCtx {
            read_only: opts.read_only,
            cache_size: opts.cache_size,
            open_sibling: &open_sibling,
        };
        let map = format
            .open(file.clone(), &ctx)
            .map_err(|e| e.in_file(path))?;
        let info = map.info();
        let backing = match &info.backing {
            None => None,
            Some(b) => {
                let bpath = Self::find_backing(path, &dir, b, &*map, opts)?;
                Some(Arc::new(Self::open_backing(path, &bpath, b, opts, depth)?))
            }
        };
        if let Some(b) = &backing {
            map.check_backing(&b.info()).map_err(|e| e.in_file(path))?;
        }
        let probed_raw = probed && format.name() == "raw";
        let read_only = opts.read_only || !map.writable();
        Ok(Self::assemble(
            path,
            file,
            map,
            format.name(),
            backing,
            read_only,
            probed_raw,
        ))
    }

    /// Put an open image together; `Data` extents go to the format's data file, if it has one.
    fn assemble(
        path: &Path,
        file: HostFile,
        map: Box<dyn BlockMap>,
        format: &'static str,
        backing: Option<Arc<Image>>,
        read_only: bool,
        probed_raw: bool,
    ) -> Image {
        let info = map.info();
        Image {
            path: path.to_path_buf(),
            data: map.data_file().unwrap_or_else(|| file.clone()),
            file,
            format,
            backing,
            read_only,
            probed_raw,
            degraded: AtomicBool::new(false),
            unclean: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            size: AtomicU64::new(info.virtual_size),
            resizing: parking_lot::Mutex::new(()),
            granule: info.cluster_size.max(1),
            map,
            stats: IoStats::default(),
        }
    }

    /// The backing file's path: found by identity (VDI UUID) in the search directory, or the
    /// first of the names the image gives (VHD parent locators) that exists under the policy.
    fn find_backing(
        path: &Path,
        dir: &Path,
        b: &BackingRef,
        map: &dyn BlockMap,
        opts: &OpenOpts,
    ) -> Result<PathBuf> {
        if let Some(id) = map.backing_identity() {
            let search = opts.backing_dir.as_deref().unwrap_or(dir);
            return crate::policy::find_by_identity(path, search, &id).map_err(|e| e.in_file(path));
        }
        let names: Vec<String> = std::iter::once(b.name.clone())
            .chain(map.backing_alternatives())
            .collect();
        crate::policy::resolve_first(dir, &names, opts.allow_backing_outside)
            .map_err(|e| e.in_file(path))
    }

    fn open_backing(
        path: &Path,
        bpath: &Path,
        b: &BackingRef,
        opts: &OpenOpts,
        depth: usize,
    ) -> Result<Image> {
        if depth + 1 >= opts.max_chain {
            return Err(Error::unsupported(format!(
                "backing chain deeper than {} images (at {:?})",
                opts.max_chain, b.name
            ))
            .in_file(path));
        }
        let bopts = OpenOpts {
            read_only: true,
            format: b.format.clone(),
            ..opts.clone()
        };
        Self::open_at_depth(bpath, &bopts, depth + 1).map_err(|e| {
            let msg = format!("backing file {}: {}", b.name, e);
            Error::new(e.kind(), msg).in_file(path)
        })
    }

    /// A read-only image showing internal snapshot `id` over the same backing chain.
    pub fn open_snapshot(&self, id: &str) -> Result<Image> {
        let map = self.map.open_snapshot(id)?;
        let backing = self.backing.clone();
        Ok(Self::assemble(
            &self.path,
            self.file.clone(),
            map,
            self.format,
            backing,
            true,
            false,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn format(&self) -> &'static str {
        self.format
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }
    pub fn info(&self) -> ImageInfo {
        self.map.info()
    }
    pub fn format_stats(&self) -> FormatStats {
        self.map.stats()
    }
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.map.snapshots()
    }
    /// The host file the kernel may read and write directly (FUSE passthrough), bypassing the
    /// engine: only a raw image whose guest bytes are its file bytes, and only when no engine rule
    /// applies to writes (format given explicitly, or read-only).
    pub fn passthrough_file(&self) -> Option<&HostFile> {
        let exact = self.format == "raw" && self.host_len() == self.size();
        (exact && (!self.probed_raw || self.read_only)).then_some(&self.data)
    }

    /// Host bytes used by the image file (and its external data file).
    pub fn host_allocated(&self) -> u64 {
        let mut n = self.file.allocated().unwrap_or(0);
        if self.map.data_file().is_some() {
            n += self.data.allocated().unwrap_or(0);
        }
        n
    }
    pub fn host_len(&self) -> u64 {
        self.file.len().unwrap_or(0)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {off:#x}+{len:#x} past the virtual size {:#x}",
                self.size()
            ))
            .in_file(&self.path)),
        }
    }

    /// Note a failure: count it, log it, and stop writing after corruption.
    fn failed(&self, op: &str, off: u64, e: Error) -> Error {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let e = e.in_file(&self.path);
        if op != "read" && matches!(e.kind(), ErrorKind::Io | ErrorKind::NoSpace) {
            self.unclean.store(true, Ordering::Relaxed);
        }
        if e.kind() == ErrorKind::Corrupt && !self.degraded.swap(true, Ordering::Relaxed) {
            log::error!(
                "{}: {op} at guest offset {off:#x}: {e}; image switched to read-only",
                self.path.display()
            );
        } else {
            log::warn!(
                "{}: {op} at guest offset {off:#x}: {e}",
                self.path.display()
            );
        }
        e
    }

    /// Read guest bytes. The range must lie inside the virtual size.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.count_read(buf.len());
        self.read_inner(buf, off)
            .map_err(|e| self.failed("read", off, e))
    }

    /// Read guest bytes for imgfs itself (partition table scans): like `read_at`, but not counted
    /// in the statistics, which describe what users of the disk did.
    pub fn read_internal(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.read_inner(buf, off)
            .map_err(|e| self.failed("read", off, e))
    }

    /// Count a read in the image's statistics (`read_at` does; a spliced read calls this).
    pub(crate) fn count_read(&self, len: usize) {
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Describe the guest bytes `off..off+len` as runs of host files (this image's or a
    /// backing image's) and zeros, without reading them, for a reader that moves pages instead
    /// of copying (splice). `None` when some part needs `read_at` instead (compressed or
    /// encrypted clusters, a host file without a descriptor, any mapping error, which
    /// `read_at` then reports). The pieces are only valid until the next write to the range.
    pub fn read_plan(&self, off: u64, len: usize, plan: &mut Vec<ReadPiece>) -> Option<()> {
        plan.clear();
        self.check_range(off, len as u64).ok()?;
        self.plan_into(off, len, plan).ok()
    }

    fn plan_into(&self, off: u64, len: usize, plan: &mut Vec<ReadPiece>) -> Result<()> {
        let not_plannable = || Error::unsupported("read needs copying");
        self.walk_extents(off, len, |pos, n, ext| {
            match ext {
                Extent::Data { host, .. } => push_piece(
                    plan,
                    ReadPiece::Host {
                        fd: self.data.raw_fd().ok_or_else(not_plannable)?,
                        off: host,
                        len: n,
                    },
                ),
                Extent::InFile { file, host, .. } => push_piece(
                    plan,
                    ReadPiece::Host {
                        fd: self.extent_file(file)?.raw_fd().ok_or_else(not_plannable)?,
                        off: host,
                        len: n,
                    },
                ),
                Extent::Zero { .. } => push_piece(plan, ReadPiece::Zero(n)),
                Extent::Backing { .. } => {
                    // As `read_below`: the backing image's bytes, zeros past its end.
                    let inside = self
                        .backing
                        .as_ref()
                        .map_or(0, |b| b.size().saturating_sub(pos).min(n as u64) as usize);
                    if let Some(b) = self.backing.as_ref().filter(|_| inside > 0) {
                        b.plan_into(pos, inside, plan)?;
                    }
                    if inside < n {
                        push_piece(plan, ReadPiece::Zero(n - inside));
                    }
                }
                Extent::Format { .. } => return Err(not_plannable()),
            }
            Ok(())
        })
    }

    /// The one walk over the extents of a guest range: `f(pos, n, extent)` for each run, in
    /// order, each as long as the block map says (clipped to the range).
    fn walk_extents(
        &self,
        off: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, Extent) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let pos = off + done as u64;
            let want = (len - done) as u64;
            let ext = self.map.map_read(pos, want)?;
            let n = ext.len().min(want) as usize;
            if n == 0 {
                return Err(Error::corrupt("block map returned an empty extent").at(pos));
            }
            f(pos, n, ext)?;
            done += n;
        }
        Ok(())
    }

    fn read_inner(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.walk_extents(off, buf.len(), |pos, n, ext| {
            let part = &mut buf[(pos - off) as usize..][..n];
            match ext {
                Extent::Data { host, .. } => self.read_data(part, host, pos),
                Extent::InFile { file, host, .. } => {
                    self.extent_file(file)?.read_zerofill(part, host)
                }
                Extent::Zero { .. } => {
                    part.fill(0);
                    Ok(())
                }
                Extent::Backing { .. } => Below::read_below(self, pos, part),
                Extent::Format { .. } => self.map.read_format(pos, part),
            }
        })
    }

    /// The file an `InFile` extent names.
    fn extent_file(&self, file: u32) -> Result<HostFile> {
        self.map
            .extent_file(file)
            .ok_or_else(|| Error::corrupt(format!("block map named unknown file number {file}")))
    }

    /// Read a `Data` extent. Past the end of the file reads zeros (a freshly allocated cluster
    /// the format has not extended the file over yet), unless the extent starts beyond what the
    /// format ever allocated: then a table entry points outside the image.
    fn read_data(&self, part: &mut [u8], host: u64, guest: u64) -> Result<()> {
        let n = self.data.read_at(part, host)?;
        if n < part.len() {
            if n == 0 && self.map.data_end().is_some_and(|end| host >= end) {
                return Err(Error::corrupt(format!(
                    "guest offset {guest:#x} maps to host offset {host:#x}, past the end of the \
                     image's data"
                ))
                .at(host));
            }
            part[n..].fill(0);
        }
        Ok(())
    }

    /// Write guest bytes. The range must lie inside the virtual size.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, buf.len() as u64)?;
        if self.probed_raw {
            self.check_raw_magic(buf, off)?;
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.write_inner(buf, off)
            .map_err(|e| self.failed("write", off, e))
    }

    fn write_inner(&self, buf: &[u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let want = (buf.len() - done) as u64;
            let ext = self.map.map_write(pos, want, self)?;
            let n = ext.len().min(want) as usize;
            if n == 0 {
                return Err(Error::corrupt("block map returned an empty extent").at(pos));
            }
            match ext {
                Extent::Data { host, .. } => self.data.write_data_at(&buf[done..done + n], host)?,
                Extent::InFile { file, host, .. } => self
                    .extent_file(file)?
                    .write_data_at(&buf[done..done + n], host)?,
                _ => return Err(Error::corrupt(format!("map_write gave {ext:?}")).at(pos)),
            }
            done += n;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only("image is mounted read-only").in_file(&self.path));
        }
        if self.is_degraded() {
            return Err(Error::read_only(
                "image switched to read-only after finding corrupt metadata",
            )
            .in_file(&self.path));
        }
        Ok(())
    }

    /// A guest must not turn a probed raw image into something imgfs (or QEMU) would later
    /// probe as another format, e.g. a qcow2 header naming a host file as its backing file, or
    /// a fixed-VHD footer in the last sector (whose next probe would serve the disk as a VHD).
    fn check_raw_magic(&self, buf: &[u8], off: u64) -> Result<()> {
        let span = formats::MAGIC_SPAN as u64;
        let end = off + buf.len() as u64;
        let size = self.size();
        let tail_at = size.saturating_sub(span);
        let mut planted = None;
        for (at, head) in [(0, true), (tail_at, false)] {
            let len = span.min(size);
            if end <= at || off >= at + len {
                continue;
            }
            // The guarded bytes as they would read after this write.
            let mut sector = vec![0u8; len as usize];
            self.read_inner(&mut sector, at)?;
            let from = off.max(at);
            let to = end.min(at + len);
            sector[(from - at) as usize..(to - at) as usize]
                .copy_from_slice(&buf[(from - off) as usize..(to - off) as usize]);
            planted = if head {
                formats::image_magic(&sector)
            } else {
                formats::trailer_magic(&sector)
            };
            if planted.is_some() {
                break;
            }
        }
        if let Some(fmt) = planted {
            return Err(Error::new(
                ErrorKind::Permission,
                format!(
                    "refusing to write a {fmt} signature into a raw image whose format was \
                     probed (mount with --format raw to allow it)"
                ),
            )
            .in_file(&self.path));
        }
        Ok(())
    }

    /// Make `[off, off+len)` read as zeros; `unmap` also frees space where the format can.
    pub fn write_zeroes(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(off, len)?;
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        self.zero_inner(off, len, unmap)
            .map_err(|e| self.failed("discard", off, e))
    }

    fn zero_inner(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let end = off + len;
        let g = self.granule;
        let mid_start = off.div_ceil(g) * g;
        let mid_end = (end / g * g).max(mid_start);
        if mid_start >= end || mid_end <= mid_start {
            return self.write_zero_bytes(off, len);
        }
        self.write_zero_bytes(off, mid_start - off)?;
        if !self
            .map
            .write_zeroes(mid_start, mid_end - mid_start, unmap, self)?
        {
            self.write_zero_bytes(mid_start, mid_end - mid_start)?;
        }
        self.write_zero_bytes(mid_end, end - mid_end)
    }

    /// Write zero bytes over `[off, off+len)`, skipping runs that already read as zeros (so a
    /// small discard never allocates a cluster or block that was not there).
    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut zeros = Vec::new();
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let ext = self.map.map_read(pos, end - pos)?;
            let n = ext.len().clamp(1, end - pos).min(CHUNK);
            let already_zero = match ext {
                Extent::Zero { .. } => true,
                Extent::Backing { .. } => self.below_is_zero(pos, n)?,
                _ => false,
            };
            if !already_zero {
                zeros.resize(n as usize, 0);
                self.write_inner(&zeros, pos)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Does the backing chain show only zeros for `[off, off+len)`? (No backing: yes.)
    fn below_is_zero(&self, off: u64, len: u64) -> Result<bool> {
        let Some(b) = &self.backing else {
            return Ok(true);
        };
        if off >= b.size() {
            return Ok(true);
        }
        let end = (off + len).min(b.size());
        let mut pos = off;
        while pos < end {
            let ext = b.map.map_read(pos, end - pos)?;
            let n = ext.len().clamp(1, end - pos);
            let zero = match ext {
                Extent::Zero { .. } => true,
                Extent::Backing { .. } => b.below_is_zero(pos, n)?,
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let t = Instant::now();
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        let r = self.map.flush().map_err(|e| self.failed("flush", 0, e));
        let ns = t.elapsed().as_nanos() as u64;
        self.stats.flush_ns_total.fetch_add(ns, Ordering::Relaxed);
        self.stats.flush_ns_max.fetch_max(ns, Ordering::Relaxed);
        r
    }

    /// Grow the virtual disk to `new_size` (online: `truncate`, `ftruncate`, `fallocate` past
    /// the end). A smaller size is refused with a Permission error (EPERM) and a log line naming
    /// both sizes: shrinking destroys data, and only `imgfs resize --shrink` does it, offline.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_inner(new_size, false)
    }

    /// `resize`, allowing a shrink where the format supports it (offline `imgfs resize --shrink`).
    pub fn resize_allow_shrink(&self, new_size: u64) -> Result<()> {
        self.resize_inner(new_size, true)
    }

    /// Whether `resize_allow_shrink` can make this image smaller.
    pub fn can_shrink(&self) -> bool {
        self.map.can_shrink()
    }

    fn resize_inner(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.check_writable()?;
        let _one_at_a_time = self.resizing.lock();
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        if new_size < old && !allow_shrink {
            log::warn!(
                "{}: refusing to shrink the virtual disk from {old} to {new_size} bytes \
                 (shrinking destroys data; use `imgfs resize --shrink` on the unmounted image)",
                self.path.display()
            );
            return Err(Error::new(
                ErrorKind::Permission,
                format!("refusing to shrink the virtual disk from {old} to {new_size} bytes"),
            )
            .in_file(&self.path));
        }
        if new_size < old && !self.can_shrink() {
            return Err(Error::unsupported(format!(
                "shrinking {} images is not supported (it would discard data past the new end)",
                self.format
            ))
            .in_file(&self.path));
        }
        self.map.resize(new_size).map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            e.in_file(&self.path)
        })?;
        self.size.store(new_size, Ordering::Release);
        // A backing file longer than the old size would show through the new range: the new
        // range must read as zeros, as QEMU makes it.
        let shown = self
            .backing
            .as_ref()
            .map_or(0, |b| b.size().min(new_size).saturating_sub(old));
        if shown > 0 {
            self.zero_inner(old, shown, false)
                .and_then(|()| self.map.flush())
                .map_err(|e| self.failed("resize", old, e))?;
        }
        log::info!(
            "{}: virtual disk resized from {old} to {new_size} bytes",
            self.path.display()
        );
        Ok(())
    }

    /// Flush and close cleanly (clear dirty flags). Idempotent; the backing chain is read-only
    /// and needs no close.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) || self.read_only {
            return Ok(());
        }
        if self.is_degraded() || self.unclean.load(Ordering::Relaxed) {
            // Write back what is safe, but do not mark a damaged image clean.
            return self.map.flush().map_err(|e| e.in_file(&self.path));
        }
        self.map.close().map_err(|e| e.in_file(&self.path))
    }

    /// Next guest offset >= `off` that holds data (SEEK_DATA); None when only holes follow.
    pub fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        self.seek(off, true)
    }

    /// Next guest offset >= `off` in a hole (SEEK_HOLE); the virtual size if none.
    pub fn seek_hole(&self, off: u64) -> Result<u64> {
        Ok(self.seek(off, false)?.unwrap_or(self.size()))
    }

    fn seek(&self, mut off: u64, want_data: bool) -> Result<Option<u64>> {
        let size = self.size();
        while off < size {
            let ext = self.map.map_status(off, size - off)?;
            let n = ext.len().max(1);
            let is_data = match ext {
                Extent::Data { .. } | Extent::InFile { .. } | Extent::Format { .. } => Some(true),
                Extent::Zero { .. } => Some(false),
                Extent::Backing { .. } => None,
            };
            match is_data {
                Some(d) if d == want_data => return Ok(Some(off)),
                Some(_) => {}
                None => {
                    // Ask the backing chain about this run.
                    if let Some(found) = self.seek_below(off, n, want_data)? {
                        return Ok(Some(found));
                    }
                }
            }
            off += n;
        }
        Ok(None)
    }

    fn seek_below(&self, off: u64, len: u64, want_data: bool) -> Result<Option<u64>> {
        let Some(b) = &self.backing else {
            return Ok((!want_data).then_some(off));
        };
        if off >= b.size() {
            return Ok((!want_data).then_some(off));
        }
        let end = (off + len).min(b.size());
        let found = if want_data {
            b.seek_data(off)?
        } else {
            Some(b.seek_hole(off)?)
        };
        Ok(match found {
            Some(p) if p < end => Some(p),
            _ if !want_data && off + len > b.size() => Some(b.size()),
            _ => None,
        })
    }
}

impl Below for Image {
    /// The bytes this image's backing chain shows at `off` (zeros without one or past its end).
    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(b) => {
                let inside = b.size().saturating_sub(off).min(buf.len() as u64) as usize;
                let (head, tail) = buf.split_at_mut(inside);
                if !head.is_empty() {
                    b.read_inner(head, off)?;
                }
                tail.fill(0);
                Ok(())
            }
        }
    }

    fn zeros_below(&self, off: u64, _len: u64) -> bool {
        self.backing.as_ref().is_none_or(|b| off >= b.size())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Metadata may be half-updated: leave the image marked dirty for the next open.
            log::error!("{}: not closed after a panic", self.path.display());
            return;
        }
        if let Err(e) = self.close() {
            log::error!("closing {}: {e}", self.path.display());
        }
    }
}

fn image_dir(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
