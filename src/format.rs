//! The contract between the engine and each image format: a format describes where guest
//! bytes live (`BlockMap` -> `Extent`) and owns its metadata; the engine does guest-data I/O.

use crate::error::{Error, Result};
use crate::host::HostFile;
use serde::Serialize;
use std::collections::BTreeMap;

/// Default metadata cache budget per image: enough L2 tables to map a 1 TiB qcow2 with 64 KiB
/// clusters twice over a 64 GiB working set, small enough for a 16 MiB RSS target.
pub const DEFAULT_CACHE_SIZE: u64 = 4 << 20;
/// One run of guest bytes starting at the offset asked for. `len` is never 0 and never more
/// than was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Stored in the data file (the image file, or an external data file) at `host`.
    Data { host: u64, len: u64 },
    /// Stored at `host` in the format's file number `file` (`BlockMap::extent_file`): images
    /// made of several files (VMDK split and flat extents). `Data` keeps meaning "the data file".
    InFile { file: u32, host: u64, len: u64 },
    /// Reads as zeros.
    Zero { len: u64 },
    /// Not allocated here: read from the backing image at the same guest offset (zeros when
    /// there is none, or past its end).
    Backing { len: u64 },
    /// The format serves these bytes itself through `read_format` (compressed clusters).
    Format { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. }
            | Extent::InFile { len, .. }
            | Extent::Zero { len }
            | Extent::Backing { len }
            | Extent::Format { len } => len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A backing file as the image header names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackingRef {
    pub name: String,
    /// Format named by the image (qcow2 backing format extension, QED raw flag...).
    pub format: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub format: &'static str,
    pub virtual_size: u64,
    /// Allocation unit (cluster, block); discards are aligned to it.
    pub cluster_size: u64,
    pub backing: Option<BackingRef>,
    /// Format-specific facts for `imgfs info` (version, dirty flags, log state...).
    pub details: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub virtual_size: u64,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
}

/// Counters a format keeps for `imgfs stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FormatStats {
    pub cache: crate::cache::CacheStats,
    pub clusters_allocated: u64,
    pub log_entries_written: u64,
    pub log_entries_replayed: u64,
}

/// What the engine offers a format while it writes: the guest-visible bytes *below* this image
/// (its backing chain, zeros where there is none), for copy-on-write fills.
pub trait Below {
    fn read_below(&self, off: u64, buf: &mut [u8]) -> Result<()>;

    /// True when `read_below` would return only zeros for `len` bytes at `off` (no backing
    /// file there), so a caller can skip reading and writing them.
    fn zeros_below(&self, _off: u64, _len: u64) -> bool {
        false
    }
}

/// What a newly used cluster's bytes outside a write are filled with (copy-on-write).
pub enum Fill<'a> {
    Zeros,
    /// The backing chain's bytes at guest offset `guest`: `inside` bytes of them (the rest,
    /// past the virtual disk, zeros).
    Below {
        below: &'a dyn Below,
        guest: u64,
        inside: usize,
    },
    /// These bytes (the cluster's old contents).
    Bytes(&'a [u8]),
}

/// The backing chain's bytes of one cluster, read before a format takes its allocation lock so
/// that other writers do not wait on that read. Valid for as long as the cluster stays
/// unallocated in this image (what lies below an image does not change while it is open).
pub struct Prefetched {
    start: u64,
    bytes: Vec<u8>,
}

impl Prefetched {
    /// For a write of `[off, off+len)` into the `cs`-byte cluster at guest offset `start` of an
    /// image of `virtual_size` bytes. None when the write covers the whole cluster or there is
    /// nothing but zeros below.
    pub fn read(
        below: &dyn Below,
        start: u64,
        cs: u64,
        (off, len): (u64, u64),
        virtual_size: u64,
    ) -> Result<Option<Prefetched>> {
        let partial = off > start || off + len < start + cs;
        if !partial || below.zeros_below(start, cs) {
            return Ok(None);
        }
        let mut bytes = vec![0u8; cs as usize];
        let inside = virtual_size.saturating_sub(start).min(cs) as usize;
        below.read_below(start, &mut bytes[..inside])?;
        Ok(Some(Prefetched { start, bytes }))
    }

    /// The fill of `len` bytes at guest offset `guest` from below: the prefetched bytes when
    /// they cover it, else read from `below` (zeros past `virtual_size`).
    pub fn fill<'a>(
        pre: Option<&'a Prefetched>,
        below: &'a dyn Below,
        guest: u64,
        len: u64,
        virtual_size: u64,
    ) -> Fill<'a> {
        match pre {
            Some(p) if guest >= p.start && guest + len <= p.start + p.bytes.len() as u64 => {
                Fill::Bytes(&p.bytes[(guest - p.start) as usize..])
            }
            _ => Fill::Below {
                below,
                guest,
                inside: virtual_size.saturating_sub(guest).min(len) as usize,
            },
        }
    }
}

/// Write `len` bytes of `fill` at `host` in `file`. When `host_zero` (the host file reads zeros
/// there already: the range lies past its end) zeros are neither built nor written.
pub fn write_fill(
    file: &HostFile,
    host: u64,
    len: usize,
    fill: Fill,
    host_zero: bool,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let zeros = match fill {
        Fill::Zeros => true,
        Fill::Below { below, guest, .. } => below.zeros_below(guest, len as u64),
        Fill::Bytes(_) => false,
    };
    if host_zero && zeros {
        return Ok(());
    }
    let mut buf = vec![0u8; len];
    match fill {
        Fill::Below {
            below,
            guest,
            inside,
        } if !zeros => below.read_below(guest, &mut buf[..inside.min(len)])?,
        Fill::Bytes(b) => buf.copy_from_slice(&b[..len]),
        _ => {}
    }
    if host_zero && is_zero(&buf) {
        return Ok(());
    }
    file.write_all_at(&buf, host)
}

/// Whether `buf` holds only zero bytes (word at a time; this runs on every allocating write).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// No backing: everything below reads as zeros.
pub struct NoBelow;
impl Below for NoBelow {
    fn read_below(&self, _off: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn zeros_below(&self, _off: u64, _len: u64) -> bool {
        true
    }
}

/// One image format's map from guest offsets to where the bytes are. Implementations own their
/// metadata (tables, refcounts, logs) and their locking; they never open other images.
pub trait BlockMap: Send + Sync {
    fn info(&self) -> ImageInfo;

    /// Where the guest bytes at `off` live, for at most `len` bytes.
    fn map_read(&self, off: u64, len: u64) -> Result<Extent>;

    /// Like `map_read`, but for SEEK_DATA/SEEK_HOLE; may say `Zero` for host holes.
    fn map_status(&self, off: u64, len: u64) -> Result<Extent> {
        self.map_read(off, len)
    }

    /// Serve an `Extent::Format` run (decompress, decrypt...).
    fn read_format(&self, off: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::unsupported("format-served extent not supported").at(off))
    }

    /// Make `[off, off+len)` writable in place and return where (a `Data` or `InFile` extent,
    /// possibly shorter than `len`). Allocates as the format requires: the rest of a freshly allocated
    /// cluster is filled (from `below`, from the old cluster, or zeros) before this returns, so
    /// the engine only writes the guest bytes.
    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent>;

    /// Make a cluster-aligned range read as zeros through metadata, freeing space when `unmap`.
    /// Returns false when the format cannot express it; the engine then writes zero bytes.
    fn write_zeroes(&self, off: u64, len: u64, unmap: bool, below: &dyn Below) -> Result<bool>;

    /// Make all completed writes and all metadata durable, in a crash-safe order.
    fn flush(&self) -> Result<()>;

    /// Flush and mark the image cleanly closed (clear dirty / need-check flags).
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// The host offset below which `Data` extents can legitimately point: the end of what the
    /// format has allocated (the file may be shorter until the next flush). A read that starts
    /// past both the end of the file and this is corruption. None: unknown, read zeros there.
    fn data_end(&self) -> Option<u64> {
        None
    }

    /// Called once the backing image is open. A format whose header records which parent it
    /// was made against (VHDX's parent_linkage) refuses a parent that has changed since.
    fn check_backing(&self, _backing: &ImageInfo) -> Result<()> {
        Ok(())
    }

    /// Further names the backing file may go by, tried in order when the one in `info()` does
    /// not exist (VHD parent locators: relative, absolute, file URL).
    fn backing_alternatives(&self) -> Vec<String> {
        Vec::new()
    }

    /// A parent named only by an identifier (VirtualBox VDI: the parent's UUID). The engine
    /// looks for the one image in the search directory whose `Format::identity` equals it.
    fn backing_identity(&self) -> Option<String> {
        None
    }

    /// The file `Data` extents point into when it is not the image file itself.
    fn data_file(&self) -> Option<HostFile> {
        None
    }

    /// The file an `Extent::InFile { file, .. }` points into (opened by the format through
    /// `OpenCtx::open_sibling`, or the image file itself). None: no such file (a format bug,
    /// reported as corruption).
    fn extent_file(&self, _file: u32) -> Option<HostFile> {
        None
    }

    /// False when the format serves this image read-only whatever the mount asked (e.g. a
    /// streamOptimized VMDK); the engine then treats the image as read-only.
    fn writable(&self) -> bool {
        true
    }

    fn stats(&self) -> FormatStats {
        FormatStats::default()
    }

    fn snapshots(&self) -> Vec<SnapshotInfo> {
        Vec::new()
    }

    /// Change the virtual size to `new_size`, durably and crash-safely: after a power cut at any
    /// point the image opens with either the old or the new size. Growing makes the new range
    /// read as zeros (or as the backing file, where it still reaches); shrinking is asked for
    /// only by an offline `imgfs resize --shrink`, after the engine has discarded the tail.
    /// Concurrent reads and writes of the old range go on while this runs; the engine never
    /// calls it twice at once.
    fn resize(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(Error::unsupported("this image format cannot be resized"))
    }

    /// Whether `resize` may shrink this format (it discards nothing itself; the engine zeroes
    /// the tail first).
    fn can_shrink(&self) -> bool {
        false
    }

    /// A read-only view of an internal snapshot (qcow2).
    fn open_snapshot(&self, id: &str) -> Result<Box<dyn BlockMap>> {
        Err(Error::unsupported(format!("no snapshot {id:?}")))
    }
}

/// What a format is told when it opens a file.
pub struct OpenCtx<'a> {
    pub read_only: bool,
    /// Metadata cache budget in bytes.
    pub cache_size: u64,
    /// Opens a file the image names (e.g. a qcow2 external data file) under the safety policy.
    pub open_sibling: &'a dyn Fn(&str) -> Result<HostFile>,
}

/// What `create` is asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub size: u64,
    pub backing: Option<BackingRef>,
    /// Info of the opened backing image, when there is one.
    pub backing_info: Option<ImageInfo>,
    /// `-o key=value` options; a format must refuse keys it does not know.
    pub options: BTreeMap<String, String>,
    /// Where a long create (preallocation) reports how far it is.
    pub progress: crate::progress::Progress,
}

/// How much `check` may repair (qemu-img's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Repair {
    None,
    Leaks,
    All,
}

/// What `check` found (and fixed), shaped like qemu-img check's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Structural errors: refcount too low, entries out of range or overlapping metadata...
    pub corruptions: u64,
    /// Allocated but unreferenced clusters.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    /// One line per problem: what and where.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 2 corruptions remain, 3 only leaks remain.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}

pub trait Format: Sync {
    fn name(&self) -> &'static str;
    /// Other names `-f` accepts for this format (qemu's `vpc` is also `vhd`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// The identifier a child image may name this image by (`BlockMap::backing_identity`),
    /// read from its first bytes; None when the format has none.
    fn identity(&self, _head: &[u8]) -> Option<String> {
        None
    }
    /// Does this file start with this format's magic? `head` is the first 4 KiB (or less).
    fn probe(&self, head: &[u8]) -> bool;
    fn open(&self, file: HostFile, ctx: &OpenCtx) -> Result<Box<dyn BlockMap>>;
    /// Check (and with `repair`, fix) an image's metadata. `file` is open read-write when
    /// repairing, read-only otherwise.
    fn check(&self, _file: HostFile, _repair: Repair) -> Result<CheckReport> {
        Err(Error::unsupported(format!(
            "checking {} images is not supported",
            self.name()
        )))
    }
    /// Write a new empty image into `file` (already created, empty).
    fn create(&self, _file: &HostFile, _opts: &CreateOpts) -> Result<()> {
        Err(Error::unsupported(format!(
            "creating {} images is not supported",
            self.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_sees_a_single_byte_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf) && is_zero(&buf[1..]) && is_zero(&[]));
        for i in [0, 15, 16, 17, 4095, 4096, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            assert!(!is_zero(&buf[i..]), "from {i}");
            buf[i] = 0;
        }
    }
}
