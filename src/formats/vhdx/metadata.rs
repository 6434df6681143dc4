//! VHDX metadata region: table of items, the known items, the parent locator.
//!
//! ```text
//!   metadata region (offset/length from the region table)
//!   0      "metadata"(8) reserved(2) entry_count(u16) reserved(20)
//!   32+32i item_id guid(16) offset(u32, from region start, >= 64K) length(u32)
//!          flags(u32: 1 user, 2 virtual disk, 4 required) reserved(4)
//!
//!   file parameters: block_size(u32) flags(u32: 1 leave_blocks_allocated, 2 has_parent)
//!   virtual disk size(u64)  page 83 guid(16)  logical sector(u32)  physical sector(u32)
//!   parent locator: type guid(16) reserved(2) count(u16), then count x
//!          key_offset(u32) value_offset(u32) key_length(u16) value_length(u16)  (UTF-16LE)
//! ```

use super::header::{Guid, Region, MIB};
use crate::error::{Error, Result};
use crate::formats::{le32, le64};

pub const TABLE_SIZE: usize = 64 << 10;
pub const MAX_ITEM_LEN: u32 = MIB as u32;
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE83: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const LOGICAL_SECTOR: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PHYSICAL_SECTOR: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// Locator type of a VHDX parent.
pub const PARENT_TYPE_VHDX: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

pub const FLAG_VIRTUAL_DISK: u32 = 2;
pub const FLAG_REQUIRED: u32 = 4;

/// The validated metadata of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u64,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page83: Guid,
    pub logical_sector: u64,
    pub physical_sector: u64,
    /// Parent locator key/value pairs (differencing images).
    pub parent: Vec<(String, String)>,
}

impl Metadata {
    /// Parse the metadata region; `region` is the whole region's bytes (bounded by the caller).
    pub fn parse(region: &[u8], at: u64) -> Result<Metadata> {
        if region.len() < TABLE_SIZE || &region[0..8] != b"metadata" {
            return Err(Error::corrupt("VHDX metadata table signature is not \"metadata\"").at(at));
        }
        let count = u16::from_le_bytes([region[10], region[11]]) as usize;
        if 32 + 32 * count > TABLE_SIZE {
            return Err(
                Error::corrupt(format!("VHDX metadata table has {count} entries")).at(at + 10),
            );
        }
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83,
            LOGICAL_SECTOR,
            PHYSICAL_SECTOR,
            PARENT_LOCATOR,
        ];
        let mut items: [Option<&[u8]>; 6] = [None; 6];
        for i in 0..count {
            let e = 32 + 32 * i;
            let eat = at + e as u64;
            let id = Guid::read(region, e);
            let off = le32(region, e + 16) as u64;
            let len = le32(region, e + 20) as u64;
            let flags = le32(region, e + 24);
            let Some(k) = known.iter().position(|g| *g == id) else {
                if flags & FLAG_REQUIRED != 0 {
                    return Err(Error::unsupported(format!(
                        "VHDX metadata item {} is required but unknown",
                        id.to_braced()
                    ))
                    .at(eat));
                }
                continue;
            };
            if items[k].is_some() {
                return Err(Error::corrupt("duplicate VHDX metadata item").at(eat));
            }
            if (off < TABLE_SIZE as u64 && len != 0)
                || len > MAX_ITEM_LEN as u64
                || off + len > region.len() as u64
            {
                return Err(Error::corrupt(format!(
                    "VHDX metadata item {} at {off:#x}+{len:#x} lies outside the region",
                    id.to_braced()
                ))
                .at(eat));
            }
            items[k] = Some(&region[off as usize..(off + len) as usize]);
        }
        let need = |k: usize, min: usize, what: &str| -> Result<&[u8]> {
            match items[k] {
                Some(b) if b.len() >= min => Ok(b),
                Some(_) => {
                    Err(Error::corrupt(format!("VHDX metadata item {what} is too short")).at(at))
                }
                None => Err(Error::corrupt(format!("VHDX metadata item {what} is missing")).at(at)),
            }
        };
        let fp = need(0, 8, "file parameters")?;
        let block_size = le32(fp, 0) as u64;
        let fp_flags = le32(fp, 4);
        let virtual_size = le64(need(1, 8, "virtual disk size")?, 0);
        let page83 = Guid::read(need(2, 16, "page 83 data")?, 0);
        let logical_sector = le32(need(3, 4, "logical sector size")?, 0) as u64;
        let physical_sector = le32(need(4, 4, "physical sector size")?, 0) as u64;
        let has_parent = fp_flags & 2 != 0;
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(Error::corrupt(format!("VHDX block size {block_size:#x} invalid")).at(at));
        }
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(Error::corrupt(format!(
                "VHDX logical sector size {logical_sector} (must be 512 or 4096)"
            ))
            .at(at));
        }
        if physical_sector != 512 && physical_sector != 4096 {
            return Err(Error::corrupt(format!(
                "VHDX physical sector size {physical_sector} (must be 512 or 4096)"
            ))
            .at(at));
        }
        if virtual_size == 0
            || virtual_size > MAX_VIRTUAL_SIZE
            || !virtual_size.is_multiple_of(logical_sector)
        {
            return Err(Error::corrupt(format!(
                "VHDX virtual size {virtual_size:#x} invalid (0, over 64 TiB or not sector aligned)"
            ))
            .at(at));
        }
        let parent = match (has_parent, items[5]) {
            (false, _) => Vec::new(),
            (true, None) => {
                return Err(
                    Error::corrupt("VHDX differencing image without a parent locator").at(at),
                )
            }
            (true, Some(b)) => parse_parent_locator(b, at)?,
        };
        Ok(Metadata {
            block_size,
            leave_blocks_allocated: fp_flags & 1 != 0,
            has_parent,
            virtual_size,
            page83,
            logical_sector,
            physical_sector,
            parent,
        })
    }

    pub fn parent_value(&self, key: &str) -> Option<&str> {
        self.parent
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The backing file name to hand the engine: relative_path first, then absolute paths,
    /// with Windows separators converted.
    pub fn parent_path(&self) -> Option<String> {
        if let Some(r) = self.parent_value("relative_path") {
            let p = r.replace('\\', "/");
            let p = p.strip_prefix("./").unwrap_or(&p).to_string();
            if !p.is_empty() {
                return Some(p);
            }
        }
        for key in ["absolute_win32_path", "volume_path"] {
            if let Some(a) = self.parent_value(key) {
                let p = a.replace('\\', "/");
                // A drive or volume prefix means nothing here: fall back to the file name.
                let has_prefix = p.as_bytes().get(1) == Some(&b':') || p.starts_with("//");
                let name = if has_prefix {
                    p.rsplit('/').next().unwrap_or("").to_string()
                } else {
                    p
                };
                if !name.is_empty() {
                    return Some(name);
                }
            }
        }
        None
    }

    /// Serialize a metadata region of `len` bytes (create).
    pub fn to_region(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0..8].copy_from_slice(b"metadata");
        let mut fp = Vec::new();
        fp.extend_from_slice(&(self.block_size as u32).to_le_bytes());
        let flags = self.leave_blocks_allocated as u32 | (self.has_parent as u32) << 1;
        fp.extend_from_slice(&flags.to_le_bytes());
        let mut items: Vec<(Guid, Vec<u8>, u32)> = vec![
            (FILE_PARAMETERS, fp, FLAG_REQUIRED),
            (
                VIRTUAL_DISK_SIZE,
                self.virtual_size.to_le_bytes().to_vec(),
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            ),
            (
                PAGE83,
                self.page83.0.to_vec(),
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            ),
            (
                LOGICAL_SECTOR,
                (self.logical_sector as u32).to_le_bytes().to_vec(),
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            ),
            (
                PHYSICAL_SECTOR,
                (self.physical_sector as u32).to_le_bytes().to_vec(),
                FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            ),
        ];
        if self.has_parent {
            items.push((
                PARENT_LOCATOR,
                build_parent_locator(&self.parent),
                FLAG_REQUIRED,
            ));
        }
        b[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut data_off = TABLE_SIZE;
        for (i, (g, data, flags)) in items.iter().enumerate() {
            let e = 32 + 32 * i;
            b[e..e + 16].copy_from_slice(&g.0);
            b[e + 16..e + 20].copy_from_slice(&(data_off as u32).to_le_bytes());
            b[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
            b[data_off..data_off + data.len()].copy_from_slice(data);
            data_off += data.len().div_ceil(8) * 8;
        }
        b
    }
}

fn utf16(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

fn parse_parent_locator(b: &[u8], at: u64) -> Result<Vec<(String, String)>> {
    if b.len() < 20 {
        return Err(Error::corrupt("VHDX parent locator too short").at(at));
    }
    if Guid::read(b, 0) != PARENT_TYPE_VHDX {
        return Err(Error::unsupported("VHDX parent locator type is not VHDX").at(at));
    }
    let count = u16::from_le_bytes([b[18], b[19]]) as usize;
    if 20 + 12 * count > b.len() {
        return Err(Error::corrupt("VHDX parent locator entries past the item").at(at));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + 12 * i;
        let ko = le32(b, e) as usize;
        let vo = le32(b, e + 4) as usize;
        let kl = u16::from_le_bytes([b[e + 8], b[e + 9]]) as usize;
        let vl = u16::from_le_bytes([b[e + 10], b[e + 11]]) as usize;
        let key = b.get(ko..ko.saturating_add(kl)).and_then(utf16);
        let val = b.get(vo..vo.saturating_add(vl)).and_then(utf16);
        match (key, val) {
            (Some(k), Some(v)) if kl > 0 => out.push((k, v)),
            _ => {
                return Err(
                    Error::corrupt(format!("VHDX parent locator entry {i} out of bounds")).at(at),
                )
            }
        }
    }
    Ok(out)
}

fn build_parent_locator(kv: &[(String, String)]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + 12 * kv.len()];
    b[0..16].copy_from_slice(&PARENT_TYPE_VHDX.0);
    b[18..20].copy_from_slice(&(kv.len() as u16).to_le_bytes());
    for (i, (k, v)) in kv.iter().enumerate() {
        let mut put = |s: &str| -> (u32, u16) {
            let off = b.len() as u32;
            for u in s.encode_utf16() {
                b.extend_from_slice(&u.to_le_bytes());
            }
            (off, (b.len() as u32 - off) as u16)
        };
        let (ko, kl) = put(k);
        let (vo, vl) = put(v);
        let e = 20 + 12 * i;
        b[e..e + 4].copy_from_slice(&ko.to_le_bytes());
        b[e + 4..e + 8].copy_from_slice(&vo.to_le_bytes());
        b[e + 8..e + 10].copy_from_slice(&kl.to_le_bytes());
        b[e + 10..e + 12].copy_from_slice(&vl.to_le_bytes());
    }
    b
}

/// Bound a metadata region before reading it into memory.
pub fn check_region(r: &Region) -> Result<()> {
    if r.length < TABLE_SIZE as u64 || r.length > 256 * MIB {
        return Err(Error::corrupt(format!(
            "VHDX metadata region length {:#x} out of range",
            r.length
        ))
        .at(r.offset));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metadata {
        Metadata {
            block_size: MIB,
            leave_blocks_allocated: false,
            has_parent: true,
            virtual_size: 10 * MIB,
            page83: Guid([7; 16]),
            logical_sector: 4096,
            physical_sector: 4096,
            parent: vec![
                ("parent_linkage".into(), Guid([3; 16]).to_braced()),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
        }
    }

    #[test]
    fn round_trip_and_parent_path() {
        let m = sample();
        let r = m.to_region(MIB as usize);
        let p = Metadata::parse(&r, 0).unwrap();
        assert_eq!(p, m);
        assert_eq!(p.parent_path().as_deref(), Some("base.vhdx"));
        let mut a = m.clone();
        a.parent = vec![("absolute_win32_path".into(), "C:\\vm\\base.vhdx".into())];
        assert_eq!(a.parent_path().as_deref(), Some("base.vhdx"));
    }

    #[test]
    fn hostile_items() {
        let good = sample().to_region(MIB as usize);
        // Item pointing past the region.
        let mut b = good.clone();
        b[32 + 16..32 + 20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Metadata::parse(&b, 0).is_err());
        // Item inside the table.
        let mut b = good.clone();
        b[32 + 16..32 + 20].copy_from_slice(&16u32.to_le_bytes());
        assert!(Metadata::parse(&b, 0).is_err());
        // Huge count.
        let mut b = good.clone();
        b[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(Metadata::parse(&b, 0).is_err());
        // Unknown required item.
        let mut b = good.clone();
        b[32..48].copy_from_slice(&[0xee; 16]);
        assert_eq!(
            Metadata::parse(&b, 0).unwrap_err().kind(),
            crate::error::ErrorKind::Unsupported
        );
        // Bad block size / sector size / virtual size.
        for (m, ok) in [
            (
                Metadata {
                    block_size: 3 * MIB,
                    ..sample()
                },
                false,
            ),
            (
                Metadata {
                    logical_sector: 1024,
                    ..sample()
                },
                false,
            ),
            (
                Metadata {
                    virtual_size: 0,
                    ..sample()
                },
                false,
            ),
            (
                Metadata {
                    virtual_size: 100,
                    ..sample()
                },
                false,
            ),
            (
                Metadata {
                    virtual_size: 1 << 60,
                    ..sample()
                },
                false,
            ),
        ] {
            assert_eq!(
                Metadata::parse(&m.to_region(MIB as usize), 0).is_ok(),
                ok,
                "{m:?}"
            );
        }
        // Parent locator with an entry out of bounds.
        let mut b = good;
        let loc_off = le32(&b, 32 + 5 * 32 + 16) as usize;
        b[loc_off + 20..loc_off + 24].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(Metadata::parse(&b, 0).is_err());
    }
}
