//! The 512-byte VHD footer (Microsoft "Virtual Hard Disk Image Format Specification"), big-endian:
//!
//! ```text
//!   0 cookie "conectix"   8 features   12 version    16 data_offset (u64: dynamic header)
//!  24 timestamp          28 creator application (4 chars)   32 creator version  36 creator OS
//!  40 original size      48 current size     56 cylinders (u16) 58 heads (u8) 59 sectors (u8)
//!  60 disk type (2 fixed, 3 dynamic, 4 differencing)   64 checksum   68 unique id (16)
//!  84 saved state        85..512 reserved
//! ```
//!
//! A fixed disk is its data followed by the footer; dynamic and differencing disks also keep a
//! copy of it at offset 0.

use crate::error::{Error, Result};
use crate::formats::{be32, be64};

pub const COOKIE: &[u8; 8] = b"conectix";
pub const FOOTER_LEN: usize = 512;
pub const SECTOR: u64 = 512;
/// Largest disk QEMU accepts (2040 GiB); imgfs uses the same bound.
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// CHS geometry at its maximum: the size comes from `current_size` whatever the creator.
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

/// One's complement of the byte sum of `buf`, the 4 bytes at `skip` (the checksum) left out.
pub fn checksum(buf: &[u8], skip: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

impl Footer {
    /// Parse and validate a footer (cookie, checksum, disk type).
    pub fn parse(b: &[u8]) -> Result<Footer> {
        if b.len() < FOOTER_LEN || &b[..8] != COOKIE {
            return Err(Error::corrupt(
                "no VHD footer (\"conectix\" cookie missing)",
            ));
        }
        let stored = be32(b, 64);
        let computed = checksum(&b[..FOOTER_LEN], 64);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD footer checksum {stored:#010x} does not match its contents ({computed:#010x})"
            )));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => {
                return Err(Error::unsupported(format!(
                    "VHD disk type {t} is not fixed (2), dynamic (3) or differencing (4)"
                )))
            }
        };
        Ok(Footer {
            features: be32(b, 8),
            version: be32(b, 12),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().expect("4 bytes"),
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            cylinders: u16::from_be_bytes([b[56], b[57]]),
            heads: b[58],
            sectors: b[59],
            disk_type,
            unique_id: b[68..84].try_into().expect("16 bytes"),
            saved_state: b[84],
        })
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[..8].copy_from_slice(COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.cylinders.to_be_bytes());
        b[58] = self.heads;
        b[59] = self.sectors;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = self.saved_state;
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    pub fn chs_sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64
    }

    /// Whether the disk is sized by the footer's current size rather than by its CHS geometry.
    /// Only Virtual PC ("vpc ") and old QEMU ("qemu") size disks by geometry (which rounds the
    /// size down); Hyper-V ("win "), Azure ("wa\0\0"), Disk2VHD ("d2v "), QEMU with force_size
    /// ("qem2"), XenServer ("tap\0"), XenConverter ("CTXS") and any other creator use the
    /// current size. This is QEMU 10's rule (older QEMU used the geometry for unknown creators).
    pub fn uses_current_size(&self) -> bool {
        !matches!(&self.creator_app, b"vpc " | b"qemu")
    }

    /// The guest-visible size: the current size, or the CHS geometry for creators that size by
    /// it, unless the geometry is at its maximum (then it cannot describe the disk).
    pub fn virtual_size(&self) -> u64 {
        let chs = self.chs_sectors();
        if self.uses_current_size() || chs == MAX_GEOMETRY {
            self.current_size / SECTOR * SECTOR
        } else {
            chs * SECTOR
        }
    }

    pub fn creator(&self) -> String {
        self.creator_app
            .iter()
            .map(|&c| {
                if c.is_ascii_graphic() || c == b' ' {
                    c as char
                } else {
                    '.'
                }
            })
            .collect()
    }
}

/// CHS geometry for a disk of `total_sectors` (the specification's algorithm, with QEMU's
/// extension to 255 heads above 127 GiB). The geometry may describe fewer sectors than asked.
pub fn geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(65535 * 255 * 255);
    let (heads, spt, cth);
    if total > 65535 * 16 * 63 {
        spt = 255u64;
        heads = if total > 65535 * 16 * 255 { 255 } else { 16 };
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    ((cth / heads).min(65535) as u16, heads as u8, spt as u8)
}

/// Seconds since the VHD epoch, as footers and parent time stamps record them.
pub fn now_stamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    unix.saturating_sub(VHD_EPOCH) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 1,
            creator_app: *b"qemu",
            creator_version: 0x0005_0003,
            creator_os: 0x5769_326b,
            original_size: 10 << 20,
            current_size: 10 << 20,
            cylinders: 0,
            heads: 0,
            sectors: 0,
            disk_type: DiskType::Dynamic,
            unique_id: [7; 16],
            saved_state: 0,
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let f = sample();
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        b[100] ^= 1;
        assert!(Footer::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
    }

    #[test]
    fn size_by_creator() {
        let mut f = sample();
        let (c, h, s) = geometry((10 << 20) / 512);
        (f.cylinders, f.heads, f.sectors) = (c, h, s);
        let chs = c as u64 * h as u64 * s as u64 * 512;
        assert!(chs <= 10 << 20);
        for (app, want) in [
            (*b"vpc ", chs),
            (*b"qemu", chs),
            (*b"xyz ", 10 << 20),
            (*b"win ", 10 << 20),
            (*b"qem2", 10 << 20),
            (*b"d2v ", 10 << 20),
            (*b"CTXS", 10 << 20),
            (*b"tap\0", 10 << 20),
            (*b"wa\0\0", 10 << 20),
        ] {
            f.creator_app = app;
            assert_eq!(f.virtual_size(), want, "{:?}", app);
        }
        f.creator_app = *b"vpc ";
        (f.cylinders, f.heads, f.sectors) = (65535, 16, 255);
        assert_eq!(f.virtual_size(), 10 << 20);
    }
}
