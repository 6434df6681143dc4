//! HostFile: the only way imgfs touches an image file. Positional I/O only (no shared seek
//! offset), every error names the file and offset. Two backends: a real file, and `FaultFile`,
//! an in-memory twin that records writes and syncs so crash tests can "cut the power" at any
//! point and get back what a disk might have kept.

use crate::error::{Error, Result};
use parking_lot::{Mutex, MutexGuard};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a host file backend must do. Implemented by `RealFile` and `FaultFile`.
#[allow(clippy::len_without_is_empty)]
pub trait HostBackend: Send + Sync {
    /// Read at `off`; may return fewer bytes only at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocate a range; it reads as zeros afterwards and the file length is unchanged.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    /// Host bytes actually allocated (st_blocks * 512).
    fn allocated(&self) -> io::Result<u64>;
    /// Next offset >= `off` holding data (`SEEK_DATA`); None past the last data.
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>>;
    /// Next offset >= `off` in a hole (`SEEK_HOLE`; end of file counts as a hole).
    fn seek_hole(&self, off: u64) -> io::Result<u64>;
    /// The file descriptor, for locking; None for in-memory files.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// Write `buf` at `off` bypassing the host page cache (O_DIRECT), when this backend can:
    /// `Ok(false)` means nothing was written and the caller writes through `write_all_at`.
    /// Callers pass `off`, `buf.len()` and the buffer's address aligned to `DIRECT_ALIGN`.
    fn write_direct_at(&self, _buf: &[u8], _off: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// How many writes `write_direct_at` has done.
    fn direct_writes(&self) -> u64 {
        0
    }
    /// A hint before a buffered guest-data write of `len` bytes at `off`: start reading the
    /// partial pages at its edges (nothing where the backend has no page cache).
    fn prefetch_edges(&self, _off: u64, _len: u64) {}
}

/// Alignment of offset, length and memory for direct writes (covers every logical block size
/// up to 4 KiB, so no per-device probing is needed).
pub const DIRECT_ALIGN: usize = 4096;
/// Guest data writes at least this large go around the host page cache (`write_data_at`).
pub const DIRECT_MIN: usize = 128 << 10;

thread_local! {
    /// A `DIRECT_ALIGN`-aligned bounce buffer per thread, for direct writes whose data is not
    /// aligned in memory (the /dev/fuse transport delivers write data 80 bytes into a buffer).
    static BOUNCE: std::cell::RefCell<AlignedBuf> = const { std::cell::RefCell::new(AlignedBuf::EMPTY) };
}

/// Page-aligned heap memory that only grows.
struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
}

impl AlignedBuf {
    const EMPTY: AlignedBuf = AlignedBuf {
        ptr: std::ptr::null_mut(),
        cap: 0,
    };

    /// The first `len` bytes, after growing to at least that.
    fn get(&mut self, len: usize) -> &mut [u8] {
        if self.cap < len {
            self.free();
            let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN)
                .expect("direct write size fits a layout");
            // SAFETY: the layout has a non-zero size (len >= DIRECT_MIN). Zeroed, so the
            // slice handed out below never exposes uninitialised memory.
            self.ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            if self.ptr.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            self.cap = len;
        }
        // SAFETY: `cap >= len` initialised bytes allocated above, owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }

    fn free(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in `get` with exactly this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.cap, DIRECT_ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.free();
    }
}

/// A cheap-to-clone handle on an open host file.
#[derive(Clone)]
pub struct HostFile {
    backend: Arc<dyn HostBackend>,
    path: Arc<PathBuf>,
    writable: bool,
}

impl fmt::Debug for HostFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostFile({})", self.path.display())
    }
}

impl HostFile {
    /// Open a real file. `writable` opens it O_RDWR, otherwise O_RDONLY.
    pub fn open(path: &Path, writable: bool) -> Result<HostFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io("cannot open", e).in_file(path))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", e).in_file(path))?;
        if meta.is_dir() {
            return Err(Error::invalid("is a directory, not an image file").in_file(path));
        }
        Ok(Self::from_backend(
            Arc::new(RealFile::new(file, path, writable)),
            path,
            writable,
        ))
    }

    /// Create (or truncate) a real file for writing.
    pub fn create(path: &Path) -> Result<HostFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io("cannot create", e).in_file(path))?;
        Ok(Self::from_backend(
            Arc::new(RealFile::new(file, path, true)),
            path,
            true,
        ))
    }

    pub fn from_backend(backend: Arc<dyn HostBackend>, path: &Path, writable: bool) -> HostFile {
        HostFile {
            backend,
            path: Arc::new(path.to_path_buf()),
            writable,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.backend.raw_fd()
    }

    fn err(&self, what: &str, off: u64, e: io::Error) -> Error {
        Error::io(what.to_string(), e).at(off).in_file(&self.path)
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::read_only("image is open read-only").in_file(&self.path))
        }
    }

    /// Read as much as the file holds at `off`; returns the count (short only at end of file).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.backend.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err("read failed", off + done as u64, e)),
            }
        }
        Ok(done)
    }

    /// Read exactly `buf.len()` bytes: metadata must exist, so a short read means corruption.
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let n = self.read_at(buf, off)?;
        if n < buf.len() {
            return Err(Error::corrupt(format!(
                "structure of {} bytes runs past the end of the file",
                buf.len()
            ))
            .at(off)
            .in_file(&self.path));
        }
        Ok(())
    }

    /// Read guest data; whatever lies past end of file reads as zeros (as in QEMU).
    pub fn read_zerofill(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let n = self.read_at(buf, off)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Write guest data. Large page-aligned writes (`DIRECT_MIN` bytes or more) bypass the host
    /// page cache where the host file system allows it: buffered, every such write would first
    /// fill freshly allocated page-cache pages, and on a VM whose host takes back freed guest
    /// memory (free page reporting) touching those pages costs 3-10x the copy itself, at
    /// random. Durability is unchanged: a direct write, like a buffered one, is durable only
    /// after `sync`. Everything else goes through `write_all_at`.
    pub fn write_data_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let aligned = |v: usize| v.is_multiple_of(DIRECT_ALIGN);
        if buf.len() >= DIRECT_MIN && aligned(buf.len()) && off.is_multiple_of(DIRECT_ALIGN as u64)
        {
            self.check_writable()?;
            let r = if aligned(buf.as_ptr() as usize) {
                self.backend.write_direct_at(buf, off)
            } else {
                BOUNCE.with(|b| {
                    let mut b = b.borrow_mut();
                    let tmp = b.get(buf.len());
                    tmp.copy_from_slice(buf);
                    self.backend.write_direct_at(tmp, off)
                })
            };
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.err("write failed", off, e)),
            }
        }
        // Guest data only: metadata writes land in pages the tables were just read from.
        self.backend.prefetch_edges(off, buf.len() as u64);
        self.write_all_at(buf, off)
    }

    /// How many writes went around the host page cache (`write_data_at`).
    pub fn direct_writes(&self) -> u64 {
        self.backend.direct_writes()
    }

    pub fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.check_writable()?;
        self.backend
            .write_all_at(buf, off)
            .map_err(|e| self.err("write failed", off, e))
    }

    /// Write `len` zero bytes at `off` (in bounded chunks).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes_reporting(off, len, |_| ())
    }

    /// `write_zeroes`, calling `done(bytes)` after each chunk (for a long preallocation).
    pub fn write_zeroes_reporting(
        &self,
        off: u64,
        len: u64,
        mut done: impl FnMut(u64),
    ) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(CHUNK);
            self.write_all_at(&zeros[..n as usize], off + pos)?;
            pos += n;
            done(pos);
        }
        Ok(())
    }

    /// fdatasync: every completed write is durable when this returns.
    pub fn sync(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.backend
            .sync()
            .map_err(|e| self.err("sync failed", 0, e))
    }

    pub fn len(&self) -> Result<u64> {
        self.backend
            .len()
            .map_err(|e| Error::io("cannot stat", e).in_file(&self.path))
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        self.backend
            .set_len(len)
            .map_err(|e| self.err("cannot resize", len, e))
    }

    /// Deallocate a host range (reads zeros afterwards). Falls back to writing zeros where the
    /// host file system cannot punch holes.
    pub fn punch_hole(&self, off: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        match self.backend.punch_hole(off, len) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes(off, len),
            Err(e) => Err(self.err("cannot punch hole", off, e)),
        }
    }

    pub fn allocated(&self) -> Result<u64> {
        self.backend
            .allocated()
            .map_err(|e| Error::io("cannot stat", e).in_file(&self.path))
    }

    pub fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        self.backend
            .seek_data(off)
            .map_err(|e| self.err("SEEK_DATA failed", off, e))
    }

    pub fn seek_hole(&self, off: u64) -> Result<u64> {
        self.backend
            .seek_hole(off)
            .map_err(|e| self.err("SEEK_HOLE failed", off, e))
    }
}

/// A real file on the host.
pub struct RealFile {
    file: File,
    /// The same file opened again with O_DIRECT (writable files only), for `write_direct_at`;
    /// None where the host file system refuses O_DIRECT.
    direct: Option<File>,
    /// Cleared when the host file system turns out to refuse direct writes after all.
    direct_ok: std::sync::atomic::AtomicBool,
    direct_writes: std::sync::atomic::AtomicU64,
}

/// Closing drops this descriptor's OFD locks (`lock.rs`) explicitly first. A lock belongs to the
/// open file description, and a child forked by another thread shares that description until its
/// exec closes it: without the explicit unlock the image would stay locked for that moment after
/// imgfs let go of it, and a qemu-img started right then would be refused.
impl Drop for RealFile {
    fn drop(&mut self) {
        crate::lock::release_all(self.file.as_raw_fd());
    }
}

impl RealFile {
    fn new(file: File, path: &Path, writable: bool) -> RealFile {
        let direct = writable
            .then(|| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                    .open(path)
                    .ok()
            })
            .flatten()
            // Only if it is the same file (the path could have been replaced meanwhile).
            .filter(|d| match (d.metadata(), file.metadata()) {
                (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                _ => false,
            });
        RealFile {
            file,
            direct_ok: std::sync::atomic::AtomicBool::new(direct.is_some()),
            direct,
            direct_writes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lseek(&self, off: u64, whence: i32) -> io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl RealFile {
    /// A buffered write that starts or ends inside a page the page cache does not hold makes the
    /// kernel read that page before copying into it, synchronously and one page after the other
    /// (a 4 KiB write 512 bytes off a page boundary waits for two disk reads in a row). This asks
    /// for the partial edge pages first with readahead(2), which only starts the reads: both go to
    /// the disk as one request, and for a long write they overlap with the copy of the rest.
    /// Page-aligned writes, the norm, skip it; for pages already cached it is a lookup.
    fn read_ahead_edges(&self, off: u64, len: u64) {
        const PAGE: u64 = 4096;
        let end = off + len;
        let (head, tail) = (!off.is_multiple_of(PAGE), !end.is_multiple_of(PAGE));
        if len == 0 || !(head || tail) {
            return;
        }
        let (first, last) = (off / PAGE * PAGE, (end - 1) / PAGE * PAGE);
        let fd = self.file.as_raw_fd();
        let ahead = |at: u64, n: u64| {
            // SAFETY: readahead on a descriptor we own; no memory is passed. A failure only
            // loses the hint.
            unsafe { libc::readahead(fd, at as libc::off64_t, n as usize) };
        };
        match (head, tail) {
            (true, true) if last - first <= PAGE => ahead(first, last + PAGE - first),
            _ => {
                if head {
                    ahead(first, PAGE);
                }
                if tail && (last != first || !head) {
                    ahead(last, PAGE);
                }
            }
        }
    }
}

impl HostBackend for RealFile {
    fn prefetch_edges(&self, off: u64, len: u64) {
        self.read_ahead_edges(off, len);
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.file.read_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    fn allocated(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>> {
        self.lseek(off, libc::SEEK_DATA)
    }
    fn seek_hole(&self, off: u64) -> io::Result<u64> {
        Ok(self.lseek(off, libc::SEEK_HOLE)?.unwrap_or(off))
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
    fn write_direct_at(&self, buf: &[u8], off: u64) -> io::Result<bool> {
        use std::sync::atomic::Ordering;
        let Some(d) = self.direct.as_ref() else {
            return Ok(false);
        };
        if !self.direct_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut done = 0;
        while done < buf.len() {
            match d.write_at(&buf[done..], off + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The file system takes O_DIRECT opens but not these writes: buffered from now on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
            // A short write leaves the rest unaligned at worst: finish it buffered.
            if done < buf.len() && !done.is_multiple_of(DIRECT_ALIGN) {
                self.file.write_all_at(&buf[done..], off + done as u64)?;
                break;
            }
        }
        self.direct_writes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
    fn direct_writes(&self) -> u64 {
        self.direct_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One change not yet made durable by a sync.
#[derive(Clone, Debug)]
enum PendingOp {
    Write { off: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { off: u64, len: u64 },
}

impl PendingOp {
    fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            PendingOp::Write { off, data } => {
                let end = *off as usize + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*off as usize..end].copy_from_slice(data);
            }
            PendingOp::SetLen(len) => bytes.resize(*len as usize, 0),
            PendingOp::Punch { off, len } => {
                let start = (*off as usize).min(bytes.len());
                let end = (*off + *len).min(bytes.len() as u64) as usize;
                bytes[start..end].fill(0);
            }
        }
    }
}

#[derive(Default)]
struct FaultState {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<PendingOp>,
    writes: u64,
    syncs: u64,
    /// Writes numbered >= this fail with EIO (and are not applied).
    fail_from_write: Option<u64>,
    fail_syncs: bool,
}

/// In-memory host file that remembers what is durable. `crash_image` returns what a disk could
/// hold after a power cut: everything synced plus any subset of later writes, in any order.
#[derive(Default)]
pub struct FaultFile {
    state: Mutex<FaultState>,
}

impl FaultFile {
    pub fn new(bytes: Vec<u8>) -> Arc<FaultFile> {
        Arc::new(FaultFile {
            state: Mutex::new(FaultState {
                current: bytes.clone(),
                durable: bytes,
                ..Default::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock()
    }

    /// Wrap in a HostFile named `path` (the name is only used in messages and for siblings).
    pub fn host_file(self: &Arc<Self>, path: &Path, writable: bool) -> HostFile {
        HostFile::from_backend(self.clone(), path, writable)
    }

    /// What reads see now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
    /// What survived the last sync.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
    pub fn write_count(&self) -> u64 {
        self.lock().writes
    }
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }
    /// Make the `n`-th write from now (0 = the next one) and all after it fail with EIO.
    pub fn fail_after_writes(&self, n: u64) {
        let mut s = self.lock();
        s.fail_from_write = Some(s.writes + n);
    }
    pub fn fail_syncs(&self, fail: bool) {
        self.lock().fail_syncs = fail;
    }

    /// A power cut: the durable bytes plus a random subset of unsynced changes applied in a
    /// random order (a disk may reorder and drop anything not yet flushed).
    pub fn crash_image(&self, rng: &mut SplitMix64) -> Vec<u8> {
        let s = self.lock();
        let mut bytes = s.durable.clone();
        let mut chosen: Vec<&PendingOp> = s
            .pending
            .iter()
            .filter(|_| rng.next_u64() & 1 == 1)
            .collect();
        rng.shuffle(&mut chosen);
        for op in chosen {
            op.apply(&mut bytes);
        }
        bytes
    }

    fn record(&self, op: PendingOp) -> io::Result<()> {
        let mut s = self.lock();
        if let PendingOp::Write { .. } = op {
            let n = s.writes;
            s.writes += 1;
            if s.fail_from_write.is_some_and(|f| n >= f) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        op.apply(&mut s.current);
        s.pending.push(op);
        Ok(())
    }
}

impl HostBackend for FaultFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let s = self.lock();
        let len = s.current.len() as u64;
        if off >= len {
            return Ok(0);
        }
        let n = (len - off).min(buf.len() as u64) as usize;
        buf[..n].copy_from_slice(&s.current[off as usize..off as usize + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        off.checked_add(buf.len() as u64)
            .filter(|end| *end < (1 << 40))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.record(PendingOp::Write {
            off,
            data: buf.to_vec(),
        })
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = self.lock();
        if s.fail_syncs {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        s.syncs += 1;
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            op.apply(&mut s.durable);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len >= 1 << 40 {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.record(PendingOp::SetLen(len))
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.record(PendingOp::Punch { off, len })
    }
    fn allocated(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>> {
        Ok((off < self.lock().current.len() as u64).then_some(off))
    }
    fn seek_hole(&self, off: u64) -> io::Result<u64> {
        Ok(self.lock().current.len().max(off as usize) as u64)
    }
}

/// Small deterministic PRNG for crash tests and benchmarks (no dependency, reproducible seeds).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn large_aligned_data_writes_bypass_the_page_cache_and_stay_coherent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let h = HostFile::open(&path, true).unwrap();
        // Cached (and dirty) pages of the range first: the direct write must replace them.
        h.write_all_at(&vec![1u8; DIRECT_MIN], 1 << 20).unwrap();
        let mut want = vec![0u8; 4 << 20];
        // Aligned in memory (a Vec of this size is page-aligned by the allocator only by
        // chance, so use an aligned slice of a larger one), unaligned in memory (bounce
        // buffer), too small, and at an unaligned offset: all must land as written.
        let mut big = vec![0u8; DIRECT_MIN + 2 * DIRECT_ALIGN];
        let at = big.as_ptr().align_offset(DIRECT_ALIGN);
        let cases: [(u64, usize, u8, bool); 4] = [
            (1 << 20, at, 2, true),
            (2 << 20, at + 80, 3, true),
            (3 << 20, usize::MAX, 4, false),
            ((3 << 20) + 8192 + 512, at, 5, false),
        ];
        let mut direct = 0;
        for (off, start, byte, expect_direct) in cases {
            let data: &[u8] = if start == usize::MAX {
                &[4u8; 8192]
            } else {
                big[start..start + DIRECT_MIN].fill(byte);
                &big[start..start + DIRECT_MIN]
            };
            let before = h.direct_writes();
            h.write_data_at(data, off).unwrap();
            // The test directory's file system (ext4 here) takes O_DIRECT: it is used exactly
            // for the large aligned writes.
            let went_direct = h.direct_writes() > before;
            assert_eq!(went_direct, expect_direct, "write at {off:#x}");
            direct += went_direct as u64;
            want[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
        assert_eq!(direct, 2);
        let mut got = vec![0u8; 4 << 20];
        assert_eq!(h.read_at(&mut got, 0).unwrap(), got.len());
        assert!(got == want, "buffered reads see the direct writes");
        h.sync().unwrap();
        assert!(std::fs::read(&path).unwrap() == want);
    }

    #[test]
    fn fault_file_keeps_only_synced_data_plus_subset() {
        let f = FaultFile::new(vec![0; 16]);
        let h = f.host_file(Path::new("mem"), true);
        h.write_all_at(&[1; 4], 0).unwrap();
        h.sync().unwrap();
        h.write_all_at(&[2; 4], 4).unwrap();
        assert_eq!(&f.durable()[..8], &[1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(&f.contents()[..8], &[1, 1, 1, 1, 2, 2, 2, 2]);
        let mut seen = [false; 2];
        for seed in 0..32 {
            let img = f.crash_image(&mut SplitMix64::new(seed));
            assert_eq!(&img[..4], &[1; 4]);
            seen[(img[4] == 2) as usize] = true;
        }
        assert_eq!(seen, [true, true], "both outcomes should occur over seeds");
    }

    #[test]
    fn fault_file_fails_nth_write() {
        let f = FaultFile::new(vec![]);
        let h = f.host_file(Path::new("mem"), true);
        f.fail_after_writes(1);
        h.write_all_at(b"ok", 0).unwrap();
        let e = h.write_all_at(b"no", 2).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(f.contents(), b"ok");
    }

    #[test]
    fn read_exact_past_end_is_corrupt_not_panic() {
        let f = FaultFile::new(vec![7; 10]);
        let h = f.host_file(Path::new("mem"), false);
        let mut buf = [0u8; 8];
        assert_eq!(
            h.read_exact_at(&mut buf, 5).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        h.read_zerofill(&mut buf, 5).unwrap();
        assert_eq!(buf, [7, 7, 7, 7, 7, 0, 0, 0]);
        assert_eq!(
            h.write_all_at(b"x", 0).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }
}
