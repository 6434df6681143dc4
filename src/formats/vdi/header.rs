//! The VDI header (VirtualBox), little-endian, in the first 512 bytes:
//!
//! ```text
//!  0x000 text "<<< Oracle VM VirtualBox Disk Image >>>\n" (any text; QEMU writes its own)
//!  0x040 signature 0xbeda107f   0x044 version (1.1 = 0x00010001)   0x048 header size
//!  0x04c image type (1 dynamic, 2 static, 4 differencing)   0x050 flags   0x054 description
//!  0x154 block map offset   0x158 data offset   0x15c C/H/S   0x168 sector size (512)
//!  0x170 disk size (u64)    0x178 block size    0x17c block extra
//!  0x180 blocks in image    0x184 blocks allocated
//!  0x188 UUID of this image 0x198 UUID of its last modification
//!  0x1a8 UUID of the parent ("linkage")   0x1b8 UUID of the parent's modification
//!  0x1c8 legacy geometry (header size 0x190 only)
//! ```
//!
//! Header size 0x180 (QEMU) and 0x190 (VirtualBox, with the legacy geometry) are the two 1.1
//! headers in use; both are read, and rewritten with the size they had.

use crate::error::{Error, Result};
use crate::formats::{le32, le64};

pub const SIGNATURE: u32 = 0xbeda_107f;
pub const VERSION_1_1: u32 = 0x0001_0001;
pub const HEADER_LEN: usize = 512;
pub const SECTOR: u64 = 512;
pub const TYPE_DYNAMIC: u32 = 1;
pub const TYPE_STATIC: u32 = 2;
pub const TYPE_DIFF: u32 = 4;
pub const TEXT: &str = "<<< Oracle VM VirtualBox Disk Image >>>\n";
/// QEMU's bound: the block map, read whole, stays under 2 GiB.
pub const MAX_BLOCKS: u32 = (0x8000_0000u32 - 512) / 4;
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The whole 512 bytes as read: fields imgfs does not interpret are written back unchanged.
    pub raw: Vec<u8>,
    pub header_size: u32,
    pub image_type: u32,
    pub offset_bmap: u32,
    pub offset_data: u32,
    pub disk_size: u64,
    pub block_size: u32,
    pub blocks_in_image: u32,
    pub blocks_allocated: u32,
    pub uuid_image: [u8; 16],
    pub uuid_modify: [u8; 16],
    pub uuid_link: [u8; 16],
    pub uuid_parent_modify: [u8; 16],
}

fn uuid_at(b: &[u8], at: usize) -> [u8; 16] {
    b[at..at + 16].try_into().expect("16 bytes")
}

/// A VDI UUID (stored as a little-endian GUID) as text.
pub fn uuid_string(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*u).hyphenated().to_string()
}

pub fn is_vdi(head: &[u8]) -> bool {
    head.len() >= 0x48 && le32(head, 0x40) == SIGNATURE
}

impl Header {
    /// Parse and validate against a file of `file_len` bytes.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header> {
        if b.len() < HEADER_LEN || !is_vdi(b) {
            return Err(Error::corrupt("not a VDI image (no 0xbeda107f signature)"));
        }
        let version = le32(b, 0x44);
        if version != VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "VDI version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            ))
            .at(0x44));
        }
        let h = Header {
            raw: b[..HEADER_LEN].to_vec(),
            header_size: le32(b, 0x48),
            image_type: le32(b, 0x4c),
            offset_bmap: le32(b, 0x154),
            offset_data: le32(b, 0x158),
            disk_size: le64(b, 0x170).div_ceil(SECTOR) * SECTOR,
            block_size: le32(b, 0x178),
            blocks_in_image: le32(b, 0x180),
            blocks_allocated: le32(b, 0x184),
            uuid_image: uuid_at(b, 0x188),
            uuid_modify: uuid_at(b, 0x198),
            uuid_link: uuid_at(b, 0x1a8),
            uuid_parent_modify: uuid_at(b, 0x1b8),
        };
        h.validate(b, file_len)?;
        Ok(h)
    }

    fn validate(&self, b: &[u8], file_len: u64) -> Result<()> {
        let bad = |msg: String, at: u64| Err(Error::corrupt(msg).at(at));
        let unsup = |msg: String, at: u64| Err(Error::unsupported(msg).at(at));
        if !(0x180..=(HEADER_LEN as u32 - 0x48)).contains(&self.header_size) {
            return bad(
                format!("VDI header size {:#x} is invalid", self.header_size),
                0x48,
            );
        }
        if !matches!(self.image_type, TYPE_DYNAMIC | TYPE_STATIC | TYPE_DIFF) {
            return unsup(
                format!("VDI image type {} is not supported", self.image_type),
                0x4c,
            );
        }
        if le32(b, 0x168) != SECTOR as u32 {
            return unsup(
                format!("VDI sector size {} is not 512", le32(b, 0x168)),
                0x168,
            );
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(SECTOR as u32..=MAX_BLOCK_SIZE).contains(&bs) {
            return unsup(
                format!("VDI block size {bs} is not a power of two up to 64 MiB"),
                0x178,
            );
        }
        if le32(b, 0x17c) != 0 {
            return unsup(
                format!(
                    "VDI block extra data ({} bytes) is not supported",
                    le32(b, 0x17c)
                ),
                0x17c,
            );
        }
        if self.blocks_in_image > MAX_BLOCKS {
            return unsup(
                format!("VDI image has too many blocks ({})", self.blocks_in_image),
                0x180,
            );
        }
        if self.disk_size > self.blocks_in_image as u64 * bs as u64 {
            return bad(
                format!(
                    "VDI disk size {} is larger than its {} blocks of {bs} bytes",
                    self.disk_size, self.blocks_in_image
                ),
                0x170,
            );
        }
        let (bmap, data) = (self.offset_bmap as u64, self.offset_data as u64);
        let bmap_end = bmap + self.blocks_in_image as u64 * 4;
        if bmap % SECTOR != 0 || data % SECTOR != 0 {
            return unsup(
                format!("VDI block map {bmap:#x} or data {data:#x} is not sector-aligned"),
                0x154,
            );
        }
        if bmap < 0x48 + self.header_size as u64 || bmap_end > data || bmap_end > file_len {
            return bad(
                format!(
                    "VDI block map at {bmap:#x} ({} entries) overlaps the header or data, or lies \
                     past the end of the file ({file_len:#x})",
                    self.blocks_in_image
                ),
                0x154,
            );
        }
        let null = [0u8; 16];
        if self.image_type == TYPE_DIFF && self.uuid_link == null {
            return bad(
                "differencing VDI names no parent (null parent UUID)".into(),
                0x1a8,
            );
        }
        if self.image_type != TYPE_DIFF && self.uuid_link != null {
            return unsup(
                "VDI image with a parent UUID is not of the differencing type".into(),
                0x1a8,
            );
        }
        Ok(())
    }

    pub fn is_diff(&self) -> bool {
        self.image_type == TYPE_DIFF
    }

    /// The 512 bytes to write back (the allocated-block count is the only field that changes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.raw.clone();
        b[0x184..0x188].copy_from_slice(&self.blocks_allocated.to_le_bytes());
        b
    }
}

/// A new header (for `create` and tests that build differencing chains).
#[allow(clippy::too_many_arguments)]
pub fn build(
    image_type: u32,
    disk_size: u64,
    block_size: u32,
    blocks: u32,
    allocated: u32,
    uuids: [[u8; 16]; 4],
) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[..TEXT.len()].copy_from_slice(TEXT.as_bytes());
    let bmap_len = (blocks as u64 * 4).div_ceil(SECTOR) * SECTOR;
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut b, 0x40, SIGNATURE);
    put32(&mut b, 0x44, VERSION_1_1);
    put32(&mut b, 0x48, 0x190);
    put32(&mut b, 0x4c, image_type);
    put32(&mut b, 0x154, HEADER_LEN as u32);
    put32(&mut b, 0x158, (HEADER_LEN as u64 + bmap_len) as u32);
    put32(&mut b, 0x168, SECTOR as u32);
    b[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
    put32(&mut b, 0x178, block_size);
    put32(&mut b, 0x180, blocks);
    put32(&mut b, 0x184, allocated);
    for (i, u) in uuids.iter().enumerate() {
        b[0x188 + i * 16..0x198 + i * 16].copy_from_slice(u);
    }
    // Legacy geometry (header size 0x190): left zero, "unknown", as VirtualBox accepts.
    put32(&mut b, 0x1d4, SECTOR as u32);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_parse_round_trip_and_bounds() {
        let ids = [[1u8; 16], [2; 16], [0; 16], [0; 16]];
        let b = build(TYPE_DYNAMIC, 3 << 20, 1 << 20, 3, 0, ids);
        let h = Header::parse(&b, 1024).unwrap();
        assert_eq!(
            (h.disk_size, h.blocks_in_image, h.offset_data),
            (3 << 20, 3, 1024)
        );
        assert_eq!(h.to_bytes(), b);
        let mut bad = b.clone();
        bad[0x180..0x184].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Header::parse(&bad, 1 << 30).is_err());
        let mut bad = b.clone();
        bad[0x4c] = 4;
        assert!(Header::parse(&bad, 1024)
            .unwrap_err()
            .to_string()
            .contains("no parent"));
        let mut v0 = b;
        v0[0x44..0x48].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        assert!(Header::parse(&v0, 1024)
            .unwrap_err()
            .to_string()
            .contains("1.0"));
    }
}
