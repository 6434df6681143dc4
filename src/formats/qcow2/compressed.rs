//! Compressed clusters: descriptor decoding and decompression (raw deflate or zstd).
//!
//! ```text
//!   L2 entry (x = 62 - (cluster_bits - 8)):
//!   63 copied(0) | 62 compressed(1) | 61..x extra 512-byte sectors | x-1..0 host byte offset
//!   data occupies [offset, (offset & !511) + (sectors + 1) * 512)
//! ```

use super::header::Compression;
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::io::Read;

/// Where a compressed cluster's bytes lie in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedRef {
    pub offset: u64,
    /// Bytes from `offset` to the end of the last sector used.
    pub len: u64,
}

impl CompressedRef {
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedRef {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (62 - x)) - 1);
        let len = (sectors + 1) * 512 - (offset & 511);
        CompressedRef { offset, len }
    }
    /// The sector-aligned host range that refcounts cover.
    pub fn refcount_range(&self) -> (u64, u64) {
        let start = self.offset & !511;
        (start, self.offset + self.len - start)
    }
}

/// Read and decompress one cluster into `out` (cluster_size bytes).
pub fn read_cluster(
    file: &HostFile,
    r: CompressedRef,
    kind: Compression,
    out: &mut [u8],
) -> Result<()> {
    if r.len > 2 * out.len() as u64 + 4096 {
        return Err(Error::corrupt(format!(
            "compressed cluster of {} bytes is larger than possible",
            r.len
        ))
        .at(r.offset));
    }
    let mut input = vec![0u8; r.len as usize];
    // The last sector may lie past the end of the file.
    let n = file.read_at(&mut input, r.offset)?;
    input.truncate(n);
    decompress(&input, kind, out).map_err(|e| e.at(r.offset))
}

pub fn decompress(input: &[u8], kind: Compression, out: &mut [u8]) -> Result<()> {
    match kind {
        Compression::Deflate => {
            let mut d = flate2::Decompress::new(false);
            let st = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| Error::corrupt(format!("compressed cluster: deflate error: {e}")))?;
            if d.total_out() != out.len() as u64 {
                return Err(Error::corrupt(format!(
                    "compressed cluster decompresses to {} bytes, not {} ({st:?})",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt(format!("compressed cluster: zstd error: {e}")))?
                .single_frame();
            dec.read_exact(out)
                .map_err(|e| Error::corrupt(format!("compressed cluster: zstd error: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn decode_descriptor() {
        // 64 KiB clusters: x = 54.
        let e = (1u64 << 62) | (3u64 << 54) | 0x12345;
        let r = CompressedRef::decode(e, 16);
        assert_eq!(r.offset, 0x12345);
        assert_eq!(r.len, 4 * 512 - 0x145);
        assert_eq!(r.refcount_range(), (0x12200, 4 * 512));
    }

    #[test]
    fn deflate_and_zstd_roundtrip_and_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAA; 100]); // tail of the sector: another cluster's bytes
        let mut out = vec![0u8; 4096];
        decompress(&c, Compression::Deflate, &mut out).unwrap();
        assert_eq!(out, data);
        let mut z = zstd::bulk::compress(&data, 3).unwrap();
        z.extend_from_slice(&[0x55; 100]);
        decompress(&z, Compression::Zstd, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(&[1, 2, 3], Compression::Deflate, &mut out).is_err());
        assert!(decompress(&[1, 2, 3], Compression::Zstd, &mut out).is_err());
        assert!(decompress(&c[..10], Compression::Deflate, &mut out).is_err());
    }
}
