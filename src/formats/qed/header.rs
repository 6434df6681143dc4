//! The QED header: parsing, validation (as strict as QEMU's, without its overflow quirks) and
//! serialisation. All fields are little-endian.
//!
//! ```text
//!   0  magic "QED\0"          4  cluster_size (bytes)     8  table_size (clusters)
//!  12  header_size (clusters) 16  features                24  compat_features
//!  32  autoclear_features     40  l1_table_offset         48  image_size
//!  56  backing_filename_offset (u32)                      60  backing_filename_size (u32)
//!  64  (end; the backing file name usually follows here, inside the first header_size clusters)
//! ```

use crate::error::{Error, Result};
use crate::formats::{le32, le64};
use crate::host::HostFile;

pub const MAGIC: &[u8; 4] = b"QED\0";
pub const HEADER_LEN: usize = 64;

pub const F_BACKING_FILE: u64 = 0x01;
pub const F_NEED_CHECK: u64 = 0x02;
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
pub const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// No autoclear bits are defined: unknown ones are cleared on a read-write open.
pub const KNOWN_AUTOCLEAR: u64 = 0;

pub const MIN_CLUSTER_SIZE: u32 = 4 << 10;
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
pub const MIN_TABLE_SIZE: u32 = 1;
pub const MAX_TABLE_SIZE: u32 = 16;
/// QEMU keeps the backing file name in a PATH_MAX buffer.
pub const MAX_BACKING_NAME: u32 = 4095;
/// imgfs keeps the L1 table in memory and caches L2 tables of the same size: refuse tables
/// larger than this (QEMU's defaults make 256 KiB tables).
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u32,
    pub table_size: u32,
    pub header_size: u32,
    pub features: u64,
    pub compat_features: u64,
    pub autoclear_features: u64,
    pub l1_table_offset: u64,
    pub image_size: u64,
    pub backing_filename_offset: u32,
    pub backing_filename_size: u32,
}

pub fn is_cluster_size_valid(c: u32) -> bool {
    c.is_power_of_two() && (MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&c)
}

pub fn is_table_size_valid(t: u32) -> bool {
    t.is_power_of_two() && (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&t)
}

/// QEMU's own limit, computed in wrapping 64-bit arithmetic: images larger than this (or any
/// image when the product wraps to a small value) are refused by QEMU, so `create` keeps to it.
pub fn qemu_max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = (table_size.wrapping_mul(cluster_size) / 8) as u64;
    entries
        .wrapping_mul(cluster_size as u64)
        .wrapping_mul(entries)
}

/// Largest guest size the two-level tables of this geometry can map (u128: QEMU's u64 product
/// overflows for large cluster x table combinations).
pub fn max_image_size(cluster_size: u32, table_size: u32) -> u128 {
    let entries = table_size as u128 * cluster_size as u128 / 8;
    entries * entries * cluster_size as u128
}

impl Header {
    pub fn table_bytes(&self) -> u64 {
        self.table_size as u64 * self.cluster_size as u64
    }
    pub fn header_bytes(&self) -> u64 {
        self.header_size as u64 * self.cluster_size as u64
    }
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }
    /// Entries per table (a power of two).
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }
    pub fn has_backing(&self) -> bool {
        self.features & F_BACKING_FILE != 0
    }
    pub fn need_check(&self) -> bool {
        self.features & F_NEED_CHECK != 0
    }

    /// Parse and validate the header in `buf` (the file's first bytes) for a file of
    /// `file_len` bytes.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < HEADER_LEN || &buf[..4] != MAGIC {
            return Err(Error::invalid("not a QED image (no QED magic)").at(0));
        }
        let h = Header {
            cluster_size: le32(buf, 4),
            table_size: le32(buf, 8),
            header_size: le32(buf, 12),
            features: le64(buf, 16),
            compat_features: le64(buf, 24),
            autoclear_features: le64(buf, 32),
            l1_table_offset: le64(buf, 40),
            image_size: le64(buf, 48),
            backing_filename_offset: le32(buf, 56),
            backing_filename_size: le32(buf, 60),
        };
        h.validate(file_len)?;
        Ok(h)
    }

    fn validate(&self, file_len: u64) -> Result<()> {
        let unknown = self.features & !KNOWN_FEATURES;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "QED image uses unknown feature bits {unknown:#x}"
            ))
            .at(16));
        }
        if !is_cluster_size_valid(self.cluster_size) {
            return Err(Error::corrupt(format!(
                "QED cluster size {} is not a power of two in [4 KiB, 64 MiB]",
                self.cluster_size
            ))
            .at(4));
        }
        if !is_table_size_valid(self.table_size) {
            return Err(Error::corrupt(format!(
                "QED table size {} is not a power of two in [1, 16] clusters",
                self.table_size
            ))
            .at(8));
        }
        if self.table_bytes() > MAX_TABLE_BYTES {
            return Err(Error::unsupported(format!(
                "QED tables of {} bytes are larger than imgfs supports ({MAX_TABLE_BYTES})",
                self.table_bytes()
            ))
            .at(8));
        }
        // QEMU also refuses a header whose byte size overflows 32 bits.
        if self.header_size == 0
            || self.header_bytes() > file_len
            || self.header_bytes() > u32::MAX as u64
        {
            return Err(Error::corrupt(format!(
                "QED header size of {} clusters is invalid for a file of {file_len} bytes",
                self.header_size
            ))
            .at(12));
        }
        if !self.image_size.is_multiple_of(512)
            || self.image_size as u128 > max_image_size(self.cluster_size, self.table_size)
        {
            return Err(Error::corrupt(format!(
                "QED image size {} is not a multiple of 512 or too large for clusters of {} \
                 bytes and tables of {} clusters",
                self.image_size, self.cluster_size, self.table_size
            ))
            .at(48));
        }
        let file_size = file_len & !(self.cluster_size as u64 - 1);
        if !self.is_table_offset_valid(self.l1_table_offset, file_size) {
            return Err(Error::corrupt(format!(
                "QED L1 table offset {:#x} is unaligned, inside the header or past the end of \
                 the file",
                self.l1_table_offset
            ))
            .at(40));
        }
        if self.has_backing() {
            let end = self.backing_filename_offset as u64 + self.backing_filename_size as u64;
            if end > self.header_bytes() || self.backing_filename_size > MAX_BACKING_NAME {
                return Err(Error::corrupt(format!(
                    "QED backing file name ({} bytes at {:#x}) lies outside the header or is \
                     too long",
                    self.backing_filename_size, self.backing_filename_offset
                ))
                .at(56));
            }
        }
        Ok(())
    }

    /// A data cluster offset must be aligned, past the header and inside the file.
    pub fn is_cluster_offset_valid(&self, off: u64, file_size: u64) -> bool {
        off & (self.cluster_size as u64 - 1) == 0 && off >= self.header_bytes() && off < file_size
    }

    /// A table needs all its clusters inside the file.
    pub fn is_table_offset_valid(&self, off: u64, file_size: u64) -> bool {
        off & (self.cluster_size as u64 - 1) == 0
            && off >= self.header_bytes()
            && off
                .checked_add(self.table_bytes())
                .is_some_and(|end| end <= file_size)
    }

    /// Read the backing file name (validated by `parse`). None without the feature (or with an
    /// empty name, which QEMU treats as no backing file).
    pub fn read_backing_name(&self, file: &HostFile) -> Result<Option<String>> {
        if !self.has_backing() || self.backing_filename_size == 0 {
            return Ok(None);
        }
        let mut name = vec![0u8; self.backing_filename_size as usize];
        file.read_exact_at(&mut name, self.backing_filename_offset as u64)?;
        String::from_utf8(name).map(Some).map_err(|_| {
            Error::unsupported("QED backing file name is not valid UTF-8")
                .at(self.backing_filename_offset as u64)
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn good() -> Header {
        Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 8 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }
    const LEN: u64 = 5 * 65536;

    type Case = (fn(&mut Header), ErrorKind);

    fn parse(h: &Header, len: u64) -> Result<Header> {
        Header::parse(&h.to_bytes(), len)
    }

    #[test]
    fn round_trip() {
        let h = good();
        assert_eq!(parse(&h, LEN).unwrap(), h);
        assert_eq!(h.table_entries(), 32768);
    }

    #[test]
    fn hostile_values_are_errors() {
        let cases: Vec<Case> = vec![
            (|h| h.features = 0x10, ErrorKind::Unsupported),
            (|h| h.cluster_size = 4096 + 512, ErrorKind::Corrupt),
            (|h| h.cluster_size = 2048, ErrorKind::Corrupt),
            (|h| h.cluster_size = 128 << 20, ErrorKind::Corrupt),
            (|h| h.table_size = 0, ErrorKind::Corrupt),
            (|h| h.table_size = 3, ErrorKind::Corrupt),
            (|h| h.table_size = 32, ErrorKind::Corrupt),
            (|h| h.header_size = 0, ErrorKind::Corrupt),
            (|h| h.header_size = u32::MAX, ErrorKind::Corrupt),
            (|h| h.image_size = 1000, ErrorKind::Corrupt),
            (|h| h.image_size = !511, ErrorKind::Corrupt),
            (|h| h.l1_table_offset = 0, ErrorKind::Corrupt),
            (|h| h.l1_table_offset = 65536 + 4096, ErrorKind::Corrupt),
            (|h| h.l1_table_offset = 2 * 65536, ErrorKind::Corrupt),
            (|h| h.l1_table_offset = !0xffff, ErrorKind::Corrupt),
            (
                |h| {
                    h.features = F_BACKING_FILE;
                    h.backing_filename_offset = 65530;
                    h.backing_filename_size = 10;
                },
                ErrorKind::Corrupt,
            ),
            (
                |h| {
                    h.features = F_BACKING_FILE;
                    h.backing_filename_offset = u32::MAX;
                    h.backing_filename_size = u32::MAX;
                },
                ErrorKind::Corrupt,
            ),
        ];
        for (i, (f, kind)) in cases.into_iter().enumerate() {
            let mut h = good();
            f(&mut h);
            let e = parse(&h, LEN).expect_err(&format!("case {i}"));
            assert_eq!(e.kind(), kind, "case {i}: {e}");
        }
        // Wrong magic or short buffer.
        let mut b = good().to_bytes();
        b[3] = 1;
        assert!(Header::parse(&b, LEN).is_err());
        assert!(Header::parse(&good().to_bytes()[..40], LEN).is_err());
    }

    #[test]
    fn huge_geometry_does_not_overflow() {
        let mut h = good();
        h.cluster_size = 64 << 20;
        h.table_size = 1;
        h.l1_table_offset = 64 << 20;
        h.image_size = 1 << 62;
        assert!(parse(&h, 2 * (64 << 20)).is_ok());
        assert!(max_image_size(64 << 20, 16) > u64::MAX as u128);
        // QEMU's wrapping arithmetic: 64 MiB clusters with 1-cluster tables wrap to 0.
        assert_eq!(qemu_max_image_size(64 << 20, 1), 0);
        assert_eq!(qemu_max_image_size(65536, 4), 1u64 << 46);
    }

    #[test]
    fn table_size_one_is_accepted() {
        // QEMU's own table-offset check refuses table_size=1; the spec allows it.
        let mut h = good();
        h.table_size = 1;
        assert!(parse(&h, 2 * 65536).is_ok());
    }
}
