// Shared by every target: the input is an image file. Open it read-only from memory (log replay
// and dirty-image repair happen in memory too), then read the first, last and a few middle ranges.
//
// Speed matters here: libFuzzer under ASAN pays for every large allocation in page faults, so the
// file is held once (no copies), sparse inputs stay sparse, and the read buffer is reused.
use imgfs::host::{HostBackend, HostFile};
use imgfs::image::{Image, OpenOpts, Preopened};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A read-only in-memory file: non-overlapping extents of bytes, zeros elsewhere, `len` bytes.
pub struct MemFile {
    len: u64,
    extents: BTreeMap<u64, Vec<u8>>,
}

#[allow(dead_code)]
impl MemFile {
    pub fn dense(data: &[u8]) -> MemFile {
        let mut extents = BTreeMap::new();
        extents.insert(0, data.to_vec());
        MemFile {
            len: data.len() as u64,
            extents,
        }
    }
}

fn read_only() -> io::Error {
    io::Error::from(io::ErrorKind::PermissionDenied)
}

impl HostBackend for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if off >= self.len {
            return Ok(0);
        }
        let n = buf.len().min((self.len - off) as usize);
        let buf = &mut buf[..n];
        buf.fill(0);
        let end = off + n as u64;
        for (&start, bytes) in self.extents.range(..end).rev() {
            let e_end = start + bytes.len() as u64;
            if e_end <= off {
                break;
            }
            let s = start.max(off);
            let e = e_end.min(end);
            buf[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&bytes[(s - start) as usize..(e - start) as usize]);
        }
        Ok(n)
    }
    fn write_all_at(&self, _buf: &[u8], _off: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn allocated(&self) -> io::Result<u64> {
        Ok(self.extents.values().map(|v| v.len() as u64).sum())
    }
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>> {
        Ok((off < self.len).then_some(off))
    }
    fn seek_hole(&self, off: u64) -> io::Result<u64> {
        Ok(self.len.max(off))
    }
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 128 << 10]);
}

pub fn open_and_read(format: &str, file: MemFile) {
    // Backing files named by the input are looked up beside this (nonexistent) path.
    open_and_read_at(format, file, Path::new("/nonexistent/fuzz/image"), Preopened::default());
}

/// A standalone VMDK descriptor `desc` whose extent file `name` is `extent` (served from
/// memory through `OpenOpts::preopened`), opened and read as `open_and_read` does. The policy
/// resolves extent names to existing paths: empty placeholder files in a scratch directory.
#[allow(dead_code)]
pub fn open_descriptor_with_extent(desc: &[u8], name: &str, extent: MemFile) {
    let dir = std::env::temp_dir().join("imgfs-fuzz-extents");
    let placeholder = dir.join(name);
    if !placeholder.exists() {
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(&placeholder, b"");
    }
    let Ok(resolved) = placeholder.canonicalize() else {
        return;
    };
    let host = HostFile::from_backend(Arc::new(extent), &resolved, false);
    let files = std::collections::HashMap::from([(resolved, host)]);
    let pre = Preopened(Some(Arc::new(files)));
    open_and_read_at("vmdk", MemFile::dense(desc), &dir.join("desc.vmdk"), pre);
}

fn open_and_read_at(format: &str, file: MemFile, path: &Path, preopened: Preopened) {
    let opts = OpenOpts {
        format: Some(format.to_string()),
        read_only: true,
        lock: false,
        cache_size: 64 << 10,
        preopened,
        ..OpenOpts::default()
    };
    let host = HostFile::from_backend(Arc::new(file), path, false);
    let Ok(img) = Image::open_host(host, &opts) else {
        return;
    };
    let size = img.size();
    BUF.with(|b| {
        let mut buf = b.borrow_mut();
        for frac in [0u64, 1, 2, 3, 5, 7, 8] {
            let n = (buf.len() as u64).min(size);
            let off = (size - n) / 8 * frac;
            let _ = img.read_at(&mut buf[..n as usize], off);
        }
    });
    let _ = img.seek_data(0);
}

/// Re-seal the CRC-32C of both VHDX headers (4 KiB at 64 and 128 KiB) and both region tables
/// (64 KiB at 192 and 256 KiB), so mutations reach the metadata, BAT and log parsers instead of
/// stopping at a checksum.
#[allow(dead_code)]
pub fn fix_vhdx_checksums(data: &mut [u8]) {
    for (off, len) in [(64usize << 10, 4096usize), (128 << 10, 4096), (192 << 10, 65536), (256 << 10, 65536)] {
        if data.len() >= off + len {
            data[off + 4..off + 8].fill(0);
            let crc = crc32c::crc32c(&data[off..off + len]);
            data[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Re-seal the VHD footer copies (offset 0 and the last 512 bytes) and the dynamic header (512
/// bytes in), so mutations reach the BAT, sector bitmaps and parent locators.
#[allow(dead_code)]
pub fn fix_vpc_checksums(data: &mut [u8]) {
    let len = data.len();
    if len < 1536 {
        return;
    }
    for (off, n, at) in [(0usize, 512usize, 64usize), (512, 1024, 36), (len - 512, 512, 64)] {
        data[off + at..off + at + 4].fill(0);
        let sum = data[off..off + n].iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
        data[off + at..off + at + 4].copy_from_slice(&(!sum).to_be_bytes());
    }
}

/// The open_vhdx input: records of a 2-byte little-endian block index (4 KiB units, below 2048:
/// files up to 8 MiB) and up to 4 KiB of bytes for that block (a later record for the same block
/// wins); everything else reads zeros; the file ends after the highest block named. A VHDX file is
/// MiBs of mostly zeros (regions at 64 KiB .. 3 MiB), so inputs stay ~30-60 KiB and mutations land
/// on the bytes that matter. The first 320 KiB (headers and region tables) are made dense so their
/// checksums can be re-sealed.
#[allow(dead_code)]
pub fn vhdx_sparse(data: &[u8]) -> MemFile {
    const BLOCK: usize = 4096;
    const HEAD: usize = 320 << 10;
    let mut blocks: BTreeMap<usize, &[u8]> = BTreeMap::new();
    for r in data.chunks(BLOCK + 2).filter(|r| r.len() > 2) {
        blocks.insert((u16::from_le_bytes([r[0], r[1]]) & 0x7ff) as usize, &r[2..]);
    }
    let len = blocks.keys().map(|i| (i + 1) * BLOCK).max().unwrap_or(0);
    let mut head = vec![0u8; HEAD.min(len)];
    let mut extents = BTreeMap::new();
    for (&i, b) in &blocks {
        let at = i * BLOCK;
        if at < HEAD {
            let n = b.len().min(head.len() - at);
            head[at..at + n].copy_from_slice(&b[..n]);
        } else {
            extents.insert(at as u64, b.to_vec());
        }
    }
    fix_vhdx_checksums(&mut head);
    extents.insert(0, head);
    MemFile {
        len: len as u64,
        extents,
    }
}
