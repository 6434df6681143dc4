//! qcow2 header (v2 and v3) and header extensions: parsing with strict validation.
//!
//! ```text
//!   0  magic "QFI\xfb"          4  version (2|3)          8  backing_file_offset (u64)
//!  16  backing_file_size (u32) 20  cluster_bits          24  size (u64)
//!  32  crypt_method            36  l1_size               40  l1_table_offset (u64)
//!  48  refcount_table_offset   56  refcount_table_clusters
//!  60  nb_snapshots            64  snapshots_offset (u64)  -- v2 header ends at 72
//!  72  incompatible_features   80  compatible_features   88  autoclear_features
//!  96  refcount_order         100  header_length        104  compression_type (u8)
//!  then extensions: [type u32][len u32][data, padded to 8] ... [0][0]
//!  and the backing file name somewhere later in cluster 0.
//! ```

use crate::error::{Error, Result};
use crate::formats::{be32, be64};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
pub const V2_HEADER_LEN: usize = 72;
pub const V3_HEADER_LEN: usize = 104;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Byte offsets of header fields imgfs rewrites in place.
pub const OFF_REFCOUNT_TABLE: u64 = 48;
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits: L1 table at most 32 MiB, refcount table at most 8 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
    /// (type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }
    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }
    pub fn is_corrupt(&self) -> bool {
        self.incompatible & INCOMPAT_CORRUPT != 0
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(size: u64, cluster_bits: u32, l2_entries: u64) -> u64 {
        let clusters = size.div_ceil(1 << cluster_bits);
        clusters.div_ceil(l2_entries)
    }

    fn feature_name(&self, kind: u8, bit: u32) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == kind && u32::from(*b) == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// The first 104 bytes needed to read a header: enough to learn the cluster size.
    pub fn peek_cluster_bits(head: &[u8]) -> Result<u32> {
        if head.len() < V2_HEADER_LEN {
            return Err(Error::corrupt("file too short for a qcow2 header").at(0));
        }
        if &head[0..4] != MAGIC {
            return Err(Error::corrupt("not a qcow2 image (bad magic)").at(0));
        }
        let cb = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cb) {
            return Err(Error::unsupported(format!(
                "cluster_bits {cb} outside the supported range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            ))
            .at(20));
        }
        Ok(cb)
    }

    /// Parse and validate the header cluster `buf` (the first cluster of the file, or all of a
    /// shorter file) of a file `file_len` bytes long.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version} not supported")).at(4));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            feature_names: Vec::new(),
        };
        let crypt = be32(buf, 32);
        if crypt != 0 {
            let what = match crypt {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(format!(
                "encrypted qcow2 images are not supported (crypt_method {crypt}, {what})"
            ))
            .at(32));
        }
        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(Error::corrupt("file too short for a qcow2 v3 header").at(0));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let hl = u64::from(h.header_length);
            if hl < V3_HEADER_LEN as u64 || hl % 8 != 0 || hl > cs || hl > buf.len() as u64 {
                return Err(Error::corrupt(format!(
                    "invalid header_length {hl} (must be >= 104, a multiple of 8, within cluster 0)"
                ))
                .at(100));
            }
            if h.refcount_order > 6 {
                return Err(Error::corrupt(format!(
                    "refcount_order {} is larger than 6",
                    h.refcount_order
                ))
                .at(96));
            }
        }
        // Extensions come before the unknown-bit check so the feature name table can name bits.
        h.parse_extensions(buf, cs)?;
        h.parse_backing_name(buf, cs)?;
        h.check_features()?;
        h.check_geometry(file_len)?;
        Ok(h)
    }

    fn check_features(&mut self) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self.feature_name(0, bit).unwrap_or("unknown feature");
            return Err(Error::unsupported(format!(
                "unsupported incompatible feature bit {bit} ({name}) is set"
            ))
            .at(OFF_INCOMPAT));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 {
            if self.header_length <= 104 {
                return Err(Error::corrupt(
                    "compression type bit set but no compression_type field",
                )
                .at(100));
            }
        } else if self.compression != Compression::Deflate {
            return Err(Error::corrupt(
                "compression_type is not zero but the compression type bit is clear",
            )
            .at(104));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt(format!(
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {})",
                self.cluster_bits
            ))
            .at(20));
        }
        if self.has_data_file() {
            if self.data_file.is_none() {
                return Err(Error::unsupported(
                    "external data file bit set but the image does not name the data file",
                )
                .at(OFF_INCOMPAT));
            }
            if self.nb_snapshots != 0 {
                return Err(Error::corrupt(
                    "images with an external data file cannot have internal snapshots",
                )
                .at(60));
            }
        } else if self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            // QEMU ignores the bit without a data file; so do we (it is cleared on write).
        }
        Ok(())
    }

    fn check_geometry(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let aligned = |off: u64| off.is_multiple_of(cs);
        // L1: bounded before anything is allocated for it.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "L1 table of {} entries is larger than 32 MiB",
                self.l1_size
            ))
            .at(36));
        }
        let need = Self::l1_entries_for(self.size, self.cluster_bits, self.l2_entries());
        if need > u64::from(self.l1_size) {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries cannot map the virtual size {:#x} (needs {need})",
                self.l1_size, self.size
            ))
            .at(36));
        }
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_len, 40)?;
        } else if !aligned(self.l1_table_offset) {
            return Err(Error::corrupt("L1 table offset not cluster aligned").at(40));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount table has zero clusters").at(56));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::unsupported(format!(
                "refcount table of {} clusters is too large",
                self.refcount_table_clusters
            ))
            .at(56));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
            48,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "{} snapshots is more than the limit of {MAX_SNAPSHOTS}",
                self.nb_snapshots
            ))
            .at(60));
        }
        if self.nb_snapshots > 0 {
            // Each entry takes at least 40 bytes.
            let min = u64::from(self.nb_snapshots) * 40;
            check_table(
                "snapshot table",
                self.snapshots_offset,
                min,
                cs,
                file_len,
                64,
            )?;
        }
        if let Some(b) = &self.bitmaps {
            if b.directory_size > 0 {
                check_table(
                    "bitmap directory",
                    b.directory_offset,
                    b.directory_size,
                    cs,
                    file_len,
                    0,
                )?;
            }
        }
        Ok(())
    }

    fn parse_extensions(&mut self, buf: &[u8], cs: u64) -> Result<()> {
        let end = (buf.len() as u64).min(cs) as usize;
        let mut pos = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length as usize
        };
        if self.version == 3 && self.header_length > 104 {
            self.compression = match buf[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                t => {
                    return Err(Error::unsupported(format!("unknown compression type {t}")).at(104))
                }
            };
        }
        let mut seen: Vec<u32> = Vec::new();
        while pos + 8 <= end {
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_at = pos + 8;
            let Some(data_end) = data_at.checked_add(len).filter(|e| *e <= end) else {
                return Err(Error::corrupt(format!(
                    "header extension {ty:#x} of {len} bytes runs past the header cluster"
                ))
                .at(pos as u64));
            };
            if ty != EXT_FEATURE_NAMES && seen.contains(&ty) && ty != 0 {
                return Err(
                    Error::corrupt(format!("header extension {ty:#x} appears twice"))
                        .at(pos as u64),
                );
            }
            seen.push(ty);
            let data = &buf[data_at..data_end];
            self.parse_extension(ty, data, pos as u64)?;
            pos = data_at + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn parse_extension(&mut self, ty: u32, data: &[u8], at: u64) -> Result<()> {
        let string = |what: &str| -> Result<String> {
            if data.is_empty() || data.len() > 1023 {
                return Err(Error::corrupt(format!("{what} of {} bytes", data.len())).at(at));
            }
            String::from_utf8(data.to_vec())
                .map_err(|_| Error::corrupt(format!("{what} is not valid UTF-8")).at(at))
        };
        match ty {
            EXT_BACKING_FORMAT => self.backing_format = Some(string("backing format name")?),
            EXT_DATA_FILE => self.data_file = Some(string("external data file name")?),
            EXT_FEATURE_NAMES => {
                for e in data.chunks_exact(48) {
                    let name = &e[2..];
                    let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    let name = String::from_utf8_lossy(&name[..n]).into_owned();
                    self.feature_names.push((e[0], e[1], name));
                }
            }
            EXT_BITMAPS => {
                if data.len() < 24 {
                    return Err(Error::corrupt("bitmaps extension shorter than 24 bytes").at(at));
                }
                let b = BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                };
                if b.directory_size > (64 << 20) {
                    return Err(Error::corrupt(format!(
                        "bitmap directory of {} bytes is too large",
                        b.directory_size
                    ))
                    .at(at));
                }
                self.bitmaps = Some(b);
            }
            EXT_CRYPTO => {
                return Err(Error::unsupported("encrypted qcow2 images are not supported").at(at))
            }
            _ => {} // unknown extensions may be ignored
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8], cs: u64) -> Result<()> {
        let off = be64(buf, 8);
        if off == 0 {
            return Ok(());
        }
        let len = u64::from(be32(buf, 16));
        if len == 0 || len > 1023 {
            return Err(Error::corrupt(format!("backing file name of {len} bytes")).at(16));
        }
        let end = off.saturating_add(len);
        if end > cs || end > buf.len() as u64 || off < V2_HEADER_LEN as u64 {
            return Err(Error::corrupt("backing file name lies outside the header cluster").at(8));
        }
        let name = &buf[off as usize..end as usize];
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| Error::corrupt("backing file name is not valid UTF-8").at(off))?;
        self.backing_file = Some(name);
        Ok(())
    }
}

/// Remove every extension of type `ty` from the header cluster, durably: the extension area
/// is rewritten in one write (as QEMU rewrites its header) and only ever shrinks.
pub fn drop_extension(file: &crate::host::HostFile, h: &Header, ty: u32) -> Result<()> {
    let cs = h.cluster_size();
    let mut buf = vec![0u8; file.len()?.min(cs) as usize];
    file.read_exact_at(&mut buf, 0)?;
    let start = if h.version == 2 {
        V2_HEADER_LEN
    } else {
        h.header_length as usize
    };
    let mut pos = start;
    let mut kept = Vec::new();
    while pos + 8 <= buf.len() {
        let t = be32(&buf, pos);
        let len = be32(&buf, pos + 4) as usize;
        if t == EXT_END {
            pos += 8;
            break;
        }
        let next = pos + 8 + len.div_ceil(8) * 8;
        if next > buf.len() {
            return Err(
                Error::corrupt("header extension runs past the header cluster").at(pos as u64),
            );
        }
        if t != ty {
            kept.extend_from_slice(&buf[pos..next]);
        }
        pos = next;
    }
    kept.extend_from_slice(&[0u8; 8]);
    if kept.len() > pos - start {
        return Err(Error::corrupt("header extension area without an end marker").at(start as u64));
    }
    kept.resize(pos - start, 0);
    file.write_all_at(&kept, start as u64)?;
    file.sync()
}

/// A table at `off` of `bytes` bytes: cluster aligned, not in the header cluster, inside the file.
fn check_table(what: &str, off: u64, bytes: u64, cs: u64, file_len: u64, field: u64) -> Result<()> {
    if !off.is_multiple_of(cs) {
        return Err(
            Error::corrupt(format!("{what} offset {off:#x} is not cluster aligned")).at(field),
        );
    }
    if off == 0 {
        return Err(Error::corrupt(format!("{what} overlaps the header")).at(field));
    }
    match off.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{what} at {off:#x} ({bytes} bytes) runs past the end of the file ({file_len:#x})"
        ))
        .at(field)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// A minimal valid v3 header with 64 KiB clusters: L1 at 0x30000, refcount table at 0x10000.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[36..40].copy_from_slice(&2u32.to_be_bytes());
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    const LEN: u64 = 0x40000;

    #[test]
    fn parses_valid_v3() {
        let h = Header::parse(&v3_header(), LEN).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.l2_entries(), 8192);
    }

    #[test]
    fn extensions_and_backing_name() {
        let mut b = v3_header();
        let mut p = 104;
        put32(&mut b, p, EXT_BACKING_FORMAT);
        put32(&mut b, p + 4, 3);
        b[p + 8..p + 11].copy_from_slice(b"raw");
        p += 16;
        put32(&mut b, p, EXT_FEATURE_NAMES);
        put32(&mut b, p + 4, 48);
        b[p + 8] = 0;
        b[p + 9] = 9;
        b[p + 10..p + 15].copy_from_slice(b"fancy");
        p += 56;
        put32(&mut b, p, EXT_END);
        put64(&mut b, 8, 0x200);
        put32(&mut b, 16, 8);
        b[0x200..0x208].copy_from_slice(b"base.raw");
        let h = Header::parse(&b, LEN).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        // Unknown incompatible bit 9 is refused, named from the table.
        put64(&mut b, 72, 1 << 9);
        let e = Header::parse(&b, LEN).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("bit 9 (fancy)"), "{e}");
    }

    #[test]
    fn hostile_values_are_errors() {
        type Patch = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Patch)> = vec![
            ("magic", Box::new(|b| b[0] = b'X')),
            ("version", Box::new(|b| put32(b, 4, 4))),
            ("cluster_bits small", Box::new(|b| put32(b, 20, 8))),
            ("cluster_bits big", Box::new(|b| put32(b, 20, 40))),
            ("crypt", Box::new(|b| put32(b, 32, 2))),
            ("huge l1", Box::new(|b| put32(b, 36, u32::MAX))),
            ("l1 too small", Box::new(|b| put64(b, 24, 1 << 40))),
            ("size overflow", Box::new(|b| put64(b, 24, u64::MAX))),
            ("l1 past eof", Box::new(|b| put64(b, 40, 0x1_0000_0000))),
            ("l1 in header", Box::new(|b| put64(b, 40, 0))),
            ("l1 unaligned", Box::new(|b| put64(b, 40, 0x30200))),
            ("l1 offset overflow", Box::new(|b| put64(b, 40, !0xffff))),
            ("rt in header", Box::new(|b| put64(b, 48, 0))),
            ("rt zero clusters", Box::new(|b| put32(b, 56, 0))),
            ("rt huge", Box::new(|b| put32(b, 56, u32::MAX))),
            ("snapshots", Box::new(|b| put32(b, 60, u32::MAX))),
            (
                "snapshots past eof",
                Box::new(|b| {
                    put32(b, 60, 1);
                    put64(b, 64, 0x50000);
                }),
            ),
            ("header_length", Box::new(|b| put32(b, 100, 100))),
            ("header_length huge", Box::new(|b| put32(b, 100, !7))),
            ("refcount_order", Box::new(|b| put32(b, 96, 7))),
            (
                "ext past end",
                Box::new(|b| {
                    put32(b, 104, EXT_BACKING_FORMAT);
                    put32(b, 108, u32::MAX);
                }),
            ),
            (
                "backing name outside",
                Box::new(|b| {
                    put64(b, 8, 0xfff0);
                    put32(b, 16, 100);
                }),
            ),
            (
                "backing name overflow",
                Box::new(|b| {
                    put64(b, 8, u64::MAX);
                    put32(b, 16, 100);
                }),
            ),
            (
                "extl2 small clusters",
                Box::new(|b| {
                    put64(b, 72, INCOMPAT_EXTL2);
                    put32(b, 20, 12);
                }),
            ),
            (
                "data file without name",
                Box::new(|b| put64(b, 72, INCOMPAT_DATA_FILE)),
            ),
        ];
        for (what, f) in cases {
            let mut b = v3_header();
            f(&mut b);
            assert!(Header::parse(&b, LEN).is_err(), "{what} should be refused");
        }
        // Truncated inputs never panic.
        let b = v3_header();
        for n in [0, 3, 50, 71, 72, 100, 103] {
            assert!(Header::parse(&b[..n], LEN).is_err(), "len {n}");
        }
    }

    #[test]
    fn v2_header() {
        let mut b = v3_header();
        put32(&mut b, 4, 2);
        b[72..104].fill(0);
        let h = Header::parse(&b, LEN).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.incompatible, 0);
    }
}
