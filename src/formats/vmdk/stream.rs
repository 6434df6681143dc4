//! streamOptimized extents: grains compressed with deflate (zlib framing), each behind a
//! marker; the grain directory either in the header (as QEMU writes it) or, as VMware's
//! exports write it, after the grains with a footer copy of the header at the end.
//!
//! ```text
//!  grain:   | lba u64 | size u32 | zlib data (size bytes) ... | (sector padding)
//!  marker:  | value u64 | size u32 = 0 | type u32 | pad to 512 |   type 0 EOS, 1 GT, 2 GD, 3 footer
//!  end:     ... | footer marker | footer (header with the real gd_offset) | EOS marker |
//! ```
//!
//! imgfs serves these images read-only: rewriting compressed grains in place is impossible and
//! appending them needs the whole directory rewritten; `qemu-img convert` makes a writable copy.

use super::sparse::{Header, FLAG_MARKERS, GD_AT_END, SECTOR};
use crate::error::{Error, Result};
use crate::formats::le32;
use crate::host::HostFile;
use flate2::{Decompress, FlushDecompress, Status};

pub const MARKER_EOS: u32 = 0;
pub const MARKER_FOOTER: u32 = 3;

/// The header that describes the extent: `hdr` itself, or the footer's when the directory is at
/// the end of the file.
pub fn effective_header(file: &HostFile, hdr: Header) -> Result<Header> {
    if hdr.gd_offset != GD_AT_END {
        return Ok(hdr);
    }
    let len = file.len()?;
    if len < 4 * SECTOR {
        return Err(Error::corrupt(
            "streamOptimized VMDK too short for its footer",
        ));
    }
    let mut b = vec![0u8; 3 * SECTOR as usize];
    file.read_exact_at(&mut b, len - 3 * SECTOR)?;
    let marker_ok =
        |m: &[u8], ty: u32| crate::formats::le64(m, 0) == 0 && le32(m, 8) == 0 && le32(m, 12) == ty;
    if !marker_ok(&b[..512], MARKER_FOOTER) || !marker_ok(&b[1024..], MARKER_EOS) {
        return Err(Error::corrupt(
            "streamOptimized VMDK has its grain directory at the end but no valid footer",
        ));
    }
    let footer = Header::parse(&b[512..1024])?;
    if footer.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            "streamOptimized VMDK footer has no grain directory",
        ));
    }
    Ok(footer)
}

/// Read and inflate the compressed grain at byte `host`: a grain's worth of bytes (a short
/// grain is zero-filled).
pub fn read_grain(file: &HostFile, hdr: &Header, host: u64) -> Result<Vec<u8>> {
    let grain = hdr.grain_bytes() as usize;
    let (data_at, size) = if hdr.flags & FLAG_MARKERS != 0 {
        let mut m = [0u8; 12];
        file.read_exact_at(&mut m, host)?;
        let size = le32(&m, 8) as usize;
        if size == 0 || size > 2 * grain + 1024 {
            return Err(Error::corrupt(format!(
                "VMDK compressed grain at {host:#x} claims {size} bytes"
            )));
        }
        (host + 12, size)
    } else {
        (host, 2 * grain + 1024)
    };
    let mut packed = vec![0u8; size];
    let n = file.read_at(&mut packed, data_at)?;
    packed.truncate(n);
    // One spare byte: a grain that inflates to more than a grain fills it.
    let mut out = vec![0u8; grain + 1];
    let mut z = Decompress::new(true);
    let bad = || {
        Error::corrupt(format!(
            "VMDK compressed grain at {host:#x} does not inflate"
        ))
    };
    match z.decompress(&packed, &mut out, FlushDecompress::Finish) {
        Ok(Status::StreamEnd) if z.total_out() as usize <= grain => {}
        _ => return Err(bad()),
    }
    out.truncate(grain);
    Ok(out)
}
