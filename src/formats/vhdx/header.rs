//! VHDX header section: file identifier, the two headers, the two region tables.
//!
//! ```text
//!   0        64K       128K      192K      256K      320K ... 1M
//!   [file id][header 1][header 2][region 1][region 2][reserved]
//!
//!   header (4 KiB, CRC-32C over all 4 KiB with the checksum field zeroed):
//!     0 "head"  4 checksum  8 sequence_number  16 file_write_guid  32 data_write_guid
//!     48 log_guid  64 log_version(u16)  66 version(u16)  68 log_length(u32)  72 log_offset(u64)
//!
//!   region table (64 KiB, CRC-32C over 64 KiB):
//!     0 "regi"  4 checksum  8 entry_count  12 reserved
//!     16 + 32*i: guid(16) file_offset(u64) length(u32) flags(u32, bit 0 = required)
//! ```

use crate::error::{Error, Result};
use crate::formats::{le32, le64};
use crate::host::HostFile;

pub const MIB: u64 = 1 << 20;
pub const FILE_ID_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
pub const REGION_SIZE: usize = 64 << 10;
pub const MAX_REGION_ENTRIES: u32 = 2047;

/// A GUID as stored on disk (Microsoft mixed-endian layout kept as raw bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// Build from the textual form's fields (data1-data2-data3-data4).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    pub fn read(b: &[u8], at: usize) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[at..at + 16]);
        Guid(g)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> Result<Guid> {
        Ok(Guid(uuid::Uuid::new_v4().to_bytes_le()))
    }

    /// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` as used by parent_linkage.
    pub fn to_braced(self) -> String {
        uuid::Uuid::from_bytes_le(self.0).braced().to_string()
    }

    /// Parse the braced (or bare) textual form.
    pub fn parse(s: &str) -> Option<Guid> {
        let u = uuid::Uuid::parse_str(s.trim()).ok()?;
        Some(Guid(u.to_bytes_le()))
    }
}

pub const BAT_GUID: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_GUID: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// CRC-32C of `buf` with the 4-byte checksum field at `at` taken as zero.
pub fn crc_with_zeroed(buf: &[u8], at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &buf[at + 4..])
}

/// Store the checksum of `buf` at byte 4.
pub fn set_checksum(buf: &mut [u8]) {
    buf[4..8].fill(0);
    let c = crc32c::crc32c(buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
}

pub fn checksum_ok(buf: &[u8]) -> bool {
    le32(buf, 4) == crc_with_zeroed(buf, 4)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
    /// The whole 4 KiB as read (reserved bytes are kept on rewrite).
    pub raw: Vec<u8>,
}

impl Header {
    /// Parse one 4 KiB header; None when signature, checksum or version is wrong.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() != HEADER_SIZE || &b[0..4] != b"head" || !checksum_ok(b) {
            return None;
        }
        let h = Header {
            sequence_number: le64(b, 8),
            file_write_guid: Guid::read(b, 16),
            data_write_guid: Guid::read(b, 32),
            log_guid: Guid::read(b, 48),
            log_version: u16::from_le_bytes([b[64], b[65]]),
            version: u16::from_le_bytes([b[66], b[67]]),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
            raw: b.to_vec(),
        };
        (h.version == 1).then_some(h)
    }

    /// The first field that matters for reading the image in which `self` and `other`
    /// differ (the log to replay, the data's identity, the versions); None when they agree.
    fn disagreement(&self, other: &Header) -> Option<&'static str> {
        let fields: [(&str, bool); 5] = [
            (
                "data_write_guid",
                self.data_write_guid == other.data_write_guid,
            ),
            ("log_guid", self.log_guid == other.log_guid),
            ("log_version", self.log_version == other.log_version),
            ("log_offset", self.log_offset == other.log_offset),
            ("log_length", self.log_length == other.log_length),
        ];
        fields.iter().find(|(_, same)| !same).map(|(name, _)| *name)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = if self.raw.len() == HEADER_SIZE {
            self.raw.clone()
        } else {
            vec![0u8; HEADER_SIZE]
        };
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence_number.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        set_checksum(&mut b);
        b
    }
}

/// Both headers as found, and which one is current.
#[derive(Debug, Clone)]
pub struct Headers {
    pub slots: [Option<Header>; 2],
    pub current: usize,
}

impl Headers {
    pub fn read(file: &HostFile) -> Result<Headers> {
        let mut slots: [Option<Header>; 2] = [None, None];
        for (i, off) in HEADER_OFFSETS.iter().enumerate() {
            let mut b = vec![0u8; HEADER_SIZE];
            file.read_exact_at(&mut b, *off)?;
            slots[i] = Header::parse(&b);
        }
        Self::choose(slots)
    }

    pub fn choose(slots: [Option<Header>; 2]) -> Result<Headers> {
        let current = match (&slots[0], &slots[1]) {
            (None, None) => {
                return Err(
                    Error::corrupt("no valid VHDX header (both fail CRC/signature)")
                        .at(HEADER_OFFSETS[0]),
                )
            }
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (Some(a), Some(b)) if a.sequence_number > b.sequence_number => 0,
            (Some(a), Some(b)) if b.sequence_number > a.sequence_number => 1,
            // Disk2VHD and other Windows tools write both headers with one sequence number.
            // Windows and QEMU take the first; that is safe only when both describe the same
            // state (file_write_guid alone may differ: it only marks that the file was opened
            // for writing).
            (Some(a), Some(b)) => match a.disagreement(b) {
                None => 0,
                Some(field) => {
                    return Err(Error::corrupt(format!(
                    "both VHDX headers are valid with sequence number {} but differ in {field}: \
                         cannot tell which is current",
                    a.sequence_number
                ))
                    .at(HEADER_OFFSETS[1]))
                }
            },
        };
        let h = Headers { slots, current };
        h.validate()?;
        Ok(h)
    }

    pub fn cur(&self) -> &Header {
        self.slots[self.current]
            .as_ref()
            .expect("current header is valid")
    }

    fn validate(&self) -> Result<()> {
        let h = self.cur();
        let at = HEADER_OFFSETS[self.current];
        if h.log_version != 0 {
            return Err(Error::unsupported(format!("VHDX log version {}", h.log_version)).at(at));
        }
        let len = h.log_length as u64;
        if !len.is_multiple_of(MIB) || !h.log_offset.is_multiple_of(MIB) || h.log_offset < MIB {
            return Err(Error::corrupt(format!(
                "VHDX log at {:#x}+{len:#x} is not 1 MiB aligned or lies in the header section",
                h.log_offset
            ))
            .at(at));
        }
        if h.log_offset.checked_add(len).is_none() {
            return Err(Error::corrupt("VHDX log region overflows").at(at));
        }
        Ok(())
    }

    /// Write `new` into the non-current slot with sequence+1 and make it current (synced).
    pub fn write_next(&mut self, file: &HostFile, mut new: Header) -> Result<()> {
        let slot = 1 - self.current;
        new.sequence_number = self.cur().sequence_number + 1;
        new.raw = match &self.slots[slot] {
            Some(h) => h.raw.clone(),
            None => self.cur().raw.clone(),
        };
        let bytes = new.to_bytes();
        new.raw = bytes.clone();
        file.write_all_at(&bytes, HEADER_OFFSETS[slot])?;
        file.sync()?;
        self.slots[slot] = Some(new);
        self.current = slot;
        Ok(())
    }

    /// The spec's header update: done twice so both slots hold the new state.
    pub fn update(&mut self, file: &HostFile, f: impl Fn(&mut Header)) -> Result<()> {
        for _ in 0..2 {
            let mut h = self.cur().clone();
            f(&mut h);
            self.write_next(file, h)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        off < self.end() && self.offset < off.saturating_add(len)
    }
}

#[derive(Debug, Clone)]
pub struct RegionTable {
    pub bat: Region,
    pub metadata: Region,
}

impl RegionTable {
    /// Parse a 64 KiB region table. `file_len` bounds the regions.
    pub fn parse(b: &[u8], at: u64, file_len: u64) -> Result<RegionTable> {
        if b.len() != REGION_SIZE || &b[0..4] != b"regi" {
            return Err(Error::corrupt("VHDX region table signature is not \"regi\"").at(at));
        }
        if !checksum_ok(b) {
            return Err(Error::corrupt("VHDX region table checksum mismatch").at(at));
        }
        let count = le32(b, 8);
        if count > MAX_REGION_ENTRIES {
            return Err(Error::corrupt(format!(
                "VHDX region table has {count} entries (max 2047)"
            ))
            .at(at));
        }
        let (mut bat, mut meta) = (None, None);
        for i in 0..count as usize {
            let e = 16 + 32 * i;
            let guid = Guid::read(b, e);
            let r = Region {
                offset: le64(b, e + 16),
                length: le32(b, e + 24) as u64,
            };
            let required = le32(b, e + 28) & 1 != 0;
            let eat = at + e as u64;
            let slot = if guid == BAT_GUID {
                &mut bat
            } else if guid == METADATA_GUID {
                &mut meta
            } else if required {
                return Err(Error::unsupported(format!(
                    "VHDX region {} is required but unknown",
                    guid.to_braced()
                ))
                .at(eat));
            } else {
                continue;
            };
            if slot.is_some() {
                return Err(Error::corrupt("duplicate VHDX region table entry").at(eat));
            }
            if r.offset < MIB
                || !r.offset.is_multiple_of(MIB)
                || !r.length.is_multiple_of(MIB)
                || r.length == 0
            {
                return Err(Error::corrupt(format!(
                    "VHDX region {:#x}+{:#x} is not 1 MiB aligned or lies in the header",
                    r.offset, r.length
                ))
                .at(eat));
            }
            match r.offset.checked_add(r.length) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::corrupt(format!(
                        "VHDX region {:#x}+{:#x} lies past the end of the file ({file_len:#x})",
                        r.offset, r.length
                    ))
                    .at(eat))
                }
            }
            *slot = Some(r);
        }
        let bat = bat.ok_or_else(|| Error::corrupt("VHDX region table has no BAT").at(at))?;
        let metadata =
            meta.ok_or_else(|| Error::corrupt("VHDX region table has no metadata").at(at))?;
        if bat.overlaps(metadata.offset, metadata.length) {
            return Err(Error::corrupt("VHDX BAT and metadata regions overlap").at(at));
        }
        Ok(RegionTable { bat, metadata })
    }

    /// Read both copies through `read` (file plus any replayed log); the first valid wins.
    pub fn read(read: &dyn Fn(&mut [u8], u64) -> Result<()>, file_len: u64) -> Result<RegionTable> {
        let mut first_err = None;
        for at in REGION_OFFSETS {
            let mut b = vec![0u8; REGION_SIZE];
            read(&mut b, at)?;
            match Self::parse(&b, at, file_len) {
                Ok(t) => return Ok(t),
                Err(e) if e.kind() == crate::error::ErrorKind::Unsupported => return Err(e),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("two attempts"))
    }

    /// Serialize (used by create).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_SIZE];
        b[0..4].copy_from_slice(b"regi");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (g, r)) in [(BAT_GUID, self.bat), (METADATA_GUID, self.metadata)]
            .iter()
            .enumerate()
        {
            let e = 16 + 32 * i;
            b[e..e + 16].copy_from_slice(&g.0);
            b[e + 16..e + 24].copy_from_slice(&r.offset.to_le_bytes());
            b[e + 24..e + 28].copy_from_slice(&(r.length as u32).to_le_bytes());
            b[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes());
        }
        set_checksum(&mut b);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64) -> Header {
        let h = Header {
            sequence_number: seq,
            file_write_guid: Guid([1; 16]),
            data_write_guid: Guid([2; 16]),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
            raw: vec![],
        };
        Header::parse(&h.to_bytes()).unwrap()
    }

    #[test]
    fn guid_text_round_trip() {
        assert_eq!(
            BAT_GUID.to_braced(),
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}"
        );
        assert_eq!(Guid::parse(&BAT_GUID.to_braced()), Some(BAT_GUID));
        assert_eq!(Guid::parse("{xyz}"), None);
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A0}"), None);
    }

    #[test]
    fn header_choice_by_sequence_and_crc() {
        let h = Headers::choose([Some(header(5)), Some(header(6))]).unwrap();
        assert_eq!(h.current, 1);
        let h = Headers::choose([Some(header(7)), None]).unwrap();
        assert_eq!(h.current, 0);
        assert!(Headers::choose([None, None]).is_err());
        // Equal sequence numbers (Disk2VHD): the first header when both agree...
        let mut second = header(3);
        second.file_write_guid = Guid([9; 16]);
        let h = Headers::choose([Some(header(3)), Some(second)]).unwrap();
        assert_eq!((h.current, h.cur().file_write_guid), (0, Guid([1; 16])));
        // ...refused when they disagree on what to replay or on the data's identity.
        let mut other_log = header(3);
        other_log.log_guid = Guid([7; 16]);
        let e = Headers::choose([Some(header(3)), Some(other_log)]).unwrap_err();
        assert!(e.to_string().contains("log_guid"), "{e}");
        let mut other_data = header(3);
        other_data.data_write_guid = Guid([8; 16]);
        let e = Headers::choose([Some(header(3)), Some(other_data)]).unwrap_err();
        assert!(e.to_string().contains("data_write_guid"), "{e}");
        let mut b = header(1).to_bytes();
        b[100] ^= 1;
        assert!(Header::parse(&b).is_none());
    }

    #[test]
    fn hostile_log_location_refused() {
        let mut h = header(1);
        h.log_offset = 4096;
        assert!(Headers::choose([Some(h.clone()), None]).is_err());
        h.log_offset = !(MIB - 1);
        assert!(Headers::choose([Some(h), None]).is_err());
    }

    #[test]
    fn region_table_validation() {
        let t = RegionTable {
            bat: Region {
                offset: 2 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 3 * MIB,
                length: MIB,
            },
        };
        let b = t.to_bytes();
        assert!(RegionTable::parse(&b, 0, 4 * MIB).is_ok());
        // Past EOF.
        assert!(RegionTable::parse(&b, 0, 3 * MIB).is_err());
        // Bad CRC.
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(RegionTable::parse(&bad, 0, 4 * MIB).is_err());
        // BAT pointing into the header section.
        let mut t2 = t.clone();
        t2.bat.offset = 0;
        assert!(RegionTable::parse(&t2.to_bytes(), 0, 4 * MIB).is_err());
        // Unknown required region.
        let mut u = b.clone();
        u[8..12].copy_from_slice(&3u32.to_le_bytes());
        u[80..96].copy_from_slice(&[9; 16]);
        u[108..112].copy_from_slice(&1u32.to_le_bytes());
        set_checksum(&mut u);
        let e = RegionTable::parse(&u, 0, 4 * MIB).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Unsupported);
        // Huge entry count.
        let mut h = b;
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        set_checksum(&mut h);
        assert!(RegionTable::parse(&h, 0, 4 * MIB).is_err());
    }
}
