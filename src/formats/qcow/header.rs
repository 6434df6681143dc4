//! The qcow (version 1) header. All fields are big-endian.
//!
//! ```text
//!   0 magic "QFI\xfb"   4 version (1)   8 backing_file_offset (u64)  16 backing_file_size (u32)
//!  20 mtime (u32)      24 size (u64)   32 cluster_bits (u8)  33 l2_bits (u8)  34 padding (u16)
//!  36 crypt_method (u32)               40 l1_table_offset (u64)      48 end of header
//! ```
//!
//! L2 entries: bit 63 = compressed; then the compressed size in the `cluster_bits` bits below
//! it, and the byte offset of the compressed data in the low `63 - cluster_bits` bits.

use crate::error::{Error, Result};
use crate::formats::{be32, be64};
use crate::host::HostFile;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 48;
pub const COMPRESSED: u64 = 1 << 63;

/// An L2 entry, decoded: unallocated (0), a compressed cluster (bit 63, with its byte count in
/// the `cluster_bits` bits below and its byte offset in the low `63 - cluster_bits` bits), or
/// the byte offset of a data cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Unalloc,
    Data(u64),
    Compressed { off: u64, size: u64 },
}

impl Entry {
    pub fn decode(raw: u64, cluster_bits: u32) -> Entry {
        if raw == 0 {
            Entry::Unalloc
        } else if raw & COMPRESSED != 0 {
            let low = 63 - cluster_bits;
            Entry::Compressed {
                off: raw & ((1 << low) - 1),
                size: (raw >> low) & ((1 << cluster_bits) - 1),
            }
        } else {
            Entry::Data(raw)
        }
    }

    pub fn encode(self, cluster_bits: u32) -> u64 {
        match self {
            Entry::Unalloc => 0,
            Entry::Data(off) => off,
            Entry::Compressed { off, size } => COMPRESSED | size << (63 - cluster_bits) | off,
        }
    }
}

/// QEMU reads the backing file name into a 1024-byte buffer.
pub const MAX_BACKING_NAME: u32 = 1023;
/// The L1 table is kept in memory: refuse larger ones (32 MiB maps 8 PiB with 64 KiB clusters).
pub const MAX_L1_BYTES: u64 = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub mtime: u32,
    pub size: u64,
    pub cluster_bits: u8,
    pub l2_bits: u8,
    pub crypt_method: u32,
    pub l1_table_offset: u64,
}

/// Does `head` start with a qcow version 1 header? (qcow2 shares the magic with version 2/3.)
pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_LEN && &head[..4] == MAGIC && be32(head, 4) == VERSION
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn l2_bytes(&self) -> u64 {
        8 << self.l2_bits
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_span_bits(&self) -> u32 {
        self.cluster_bits as u32 + self.l2_bits as u32
    }
    pub fn l1_entries(&self) -> u64 {
        self.size.div_ceil(1 << self.l2_span_bits())
    }
    /// QEMU counts whole sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < HEADER_LEN || &buf[..4] != MAGIC {
            return Err(Error::invalid("not a qcow image (no QFI magic)").at(0));
        }
        let version = be32(buf, 4);
        if version != VERSION {
            return Err(
                Error::unsupported(format!("qcow version {version} is not version 1")).at(4),
            );
        }
        let h = Header {
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            mtime: be32(buf, 20),
            size: be64(buf, 24),
            cluster_bits: buf[32],
            l2_bits: buf[33],
            crypt_method: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
        };
        h.validate(file_len)?;
        Ok(h)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        if self.size <= 1 {
            return Err(
                Error::corrupt(format!("qcow image size {} is too small", self.size)).at(24),
            );
        }
        if !(9..=16).contains(&self.cluster_bits) {
            return Err(Error::corrupt(format!(
                "qcow cluster_bits {} outside 9..16 (512 bytes to 64 KiB)",
                self.cluster_bits
            ))
            .at(32));
        }
        if !(6..=13).contains(&self.l2_bits) {
            return Err(Error::corrupt(format!(
                "qcow l2_bits {} outside 6..13 (L2 tables of 512 bytes to 64 KiB)",
                self.l2_bits
            ))
            .at(33));
        }
        match self.crypt_method {
            0 => {}
            1 => {
                return Err(Error::unsupported(
                    "qcow image is AES-encrypted; encrypted qcow images are not supported",
                )
                .at(36))
            }
            m => return Err(Error::corrupt(format!("invalid qcow encryption method {m}")).at(36)),
        }
        let l1_bytes = self.l1_entries() * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "qcow L1 table of {l1_bytes} bytes is larger than imgfs supports"
            ))
            .at(24));
        }
        let l1_end = self.l1_table_offset.checked_add(l1_bytes);
        if self.l1_table_offset < HEADER_LEN as u64 || l1_end.is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "qcow L1 table ({l1_bytes} bytes at {:#x}) overlaps the header or runs past the \
                 end of the file",
                self.l1_table_offset
            ))
            .at(40));
        }
        if self.backing_file_offset != 0 {
            let end = self
                .backing_file_offset
                .checked_add(self.backing_file_size as u64);
            if self.backing_file_size > MAX_BACKING_NAME || end.is_none_or(|e| e > file_len) {
                return Err(Error::corrupt(format!(
                    "qcow backing file name ({} bytes at {:#x}) is too long or past the end of \
                     the file",
                    self.backing_file_size, self.backing_file_offset
                ))
                .at(8));
            }
        }
        Ok(())
    }

    pub fn read_backing_name(&self, file: &HostFile) -> Result<Option<String>> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(None);
        }
        let mut name = vec![0u8; self.backing_file_size as usize];
        file.read_exact_at(&mut name, self.backing_file_offset)?;
        String::from_utf8(name).map(Some).map_err(|_| {
            Error::unsupported("qcow backing file name is not valid UTF-8")
                .at(self.backing_file_offset)
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtime.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32] = self.cluster_bits;
        b[33] = self.l2_bits;
        b[36..40].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn good() -> Header {
        Header {
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 8 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
        }
    }
    type Case = (fn(&mut Header), ErrorKind);

    #[test]
    fn round_trip_and_probe() {
        let h = good();
        let b = h.to_bytes();
        assert_eq!(Header::parse(&b, 560).unwrap(), h);
        assert!(probe(&b));
        let mut v2 = b;
        v2[7] = 2;
        assert!(!probe(&v2));
        assert_eq!(
            Header::parse(&v2, 560).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(h.l1_entries(), 4);
    }

    #[test]
    fn hostile_values_are_errors() {
        let cases: Vec<Case> = vec![
            (|h| h.size = 1, ErrorKind::Corrupt),
            (|h| h.cluster_bits = 8, ErrorKind::Corrupt),
            (|h| h.cluster_bits = 17, ErrorKind::Corrupt),
            (|h| h.cluster_bits = 255, ErrorKind::Corrupt),
            (|h| h.l2_bits = 5, ErrorKind::Corrupt),
            (|h| h.l2_bits = 14, ErrorKind::Corrupt),
            (|h| h.crypt_method = 1, ErrorKind::Unsupported),
            (|h| h.crypt_method = 2, ErrorKind::Corrupt),
            (|h| h.size = u64::MAX, ErrorKind::Unsupported),
            (|h| h.size = 1 << 40, ErrorKind::Corrupt), // L1 past the end of the file
            (|h| h.l1_table_offset = 0, ErrorKind::Corrupt),
            (|h| h.l1_table_offset = u64::MAX - 8, ErrorKind::Corrupt),
            (
                |h| {
                    h.backing_file_offset = 48;
                    h.backing_file_size = 2000;
                },
                ErrorKind::Corrupt,
            ),
            (
                |h| {
                    h.backing_file_offset = u64::MAX;
                    h.backing_file_size = 10;
                },
                ErrorKind::Corrupt,
            ),
        ];
        for (i, (f, kind)) in cases.into_iter().enumerate() {
            let mut h = good();
            f(&mut h);
            let e = Header::parse(&h.to_bytes(), 560).expect_err(&format!("case {i}"));
            assert_eq!(e.kind(), kind, "case {i}: {e}");
        }
        assert!(Header::parse(&good().to_bytes()[..47], 560).is_err());
    }
}
