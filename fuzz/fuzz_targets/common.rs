// Shared by every target: the input is a whole image file. Open it read-only from memory (log replay
// and dirty-image repair happen in memory too), then read the first, last and a few middle ranges.
use imgfs::host::FaultFile;
use imgfs::image::{Image, OpenOpts};
use std::path::Path;

pub fn open_and_read(format: &str, data: &[u8]) {
    let file = FaultFile::new(data.to_vec());
    let opts = OpenOpts {
        format: Some(format.to_string()),
        read_only: true,
        lock: false,
        cache_size: 64 << 10,
        ..OpenOpts::default()
    };
    // Backing files named by the input are looked up beside this (nonexistent) path.
    let host = file.host_file(Path::new("/nonexistent/fuzz/image"), false);
    let Ok(img) = Image::open_host(host, &opts) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 128 << 10];
    for frac in [0u64, 1, 2, 3, 5, 7, 8] {
        let n = (buf.len() as u64).min(size);
        let off = (size - n) / 8 * frac;
        let _ = img.read_at(&mut buf[..n as usize], off);
    }
    let _ = img.seek_data(0);
}

/// Re-seal the CRC-32C of both VHDX headers (4 KiB at 64 and 128 KiB) and both region tables
/// (64 KiB at 192 and 256 KiB), so mutations reach the metadata, BAT and log parsers instead of
/// stopping at a checksum.
pub fn fix_vhdx_checksums(data: &mut [u8]) {
    for (off, len) in [(64usize << 10, 4096usize), (128 << 10, 4096), (192 << 10, 65536), (256 << 10, 65536)] {
        if data.len() >= off + len {
            data[off + 4..off + 8].fill(0);
            let crc = crc32c::crc32c(&data[off..off + len]);
            data[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

#[allow(dead_code)]
/// The open_vhdx input: records of a 2-byte little-endian block index (4 KiB units, below 2048:
/// files up to 8 MiB) and up to 4 KiB of bytes for that block; everything else reads zeros. A VHDX
/// file is MiBs of mostly zeros (regions at 64 KiB .. 3 MiB), so this keeps inputs ~30 KiB and
/// mutations on the bytes that matter. The file ends after the highest block named.
pub fn expand_sparse(data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 4096;
    let recs: Vec<(usize, &[u8])> = data
        .chunks(BLOCK + 2)
        .filter(|r| r.len() > 2)
        .map(|r| ((u16::from_le_bytes([r[0], r[1]]) & 0x7ff) as usize, &r[2..]))
        .collect();
    let len = recs.iter().map(|(i, _)| (i + 1) * BLOCK).max().unwrap_or(0);
    let mut v = vec![0u8; len];
    for (i, b) in recs {
        v[i * BLOCK..i * BLOCK + b.len()].copy_from_slice(b);
    }
    v
}
