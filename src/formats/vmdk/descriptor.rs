//! The VMDK text descriptor: `key=value` lines, extent lines and `ddb.*` keys.
//!
//! ```text
//!  # Disk DescriptorFile
//!  version=1
//!  CID=fffffffe                      content id, changes on the first write of a session
//!  parentCID=ffffffff                ffffffff: no parent
//!  createType="monolithicSparse"
//!  parentFileNameHint="base.vmdk"    only in a delta disk
//!  RW 204800 SPARSE "disk.vmdk"      access, sectors, type, file [, offset in sectors]
//!                                    types: SPARSE, VMFSSPARSE, SESPARSE, FLAT, VMFS, ZERO
//!  ddb.adapterType = "ide"
//! ```

use crate::error::{Error, Result};

/// Largest descriptor accepted (standalone file or embedded in a sparse extent).
pub const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Most extent lines accepted.
pub const MAX_EXTENTS: usize = 4096;
/// No parent.
pub const NO_PARENT: u32 = 0xffff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Rw,
    RdOnly,
    NoAccess,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `SPARSE` or `VMFSSPARSE`: a KDMV or COWD grain file (told apart by its magic, as QEMU
    /// does).
    Sparse,
    /// `SESPARSE`: an ESXi space-efficient sparse file.
    SeSparse,
    Flat,
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub access: Access,
    pub sectors: u64,
    pub kind: Kind,
    /// The type word as written (SPARSE, FLAT, VMFS, ZERO...).
    pub type_name: String,
    /// File name (empty for ZERO).
    pub file: String,
    /// Offset in sectors into the file (FLAT).
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub text: String,
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: String,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
    /// `ddb.*` keys in order (key, value without quotes).
    pub ddb: Vec<(String, String)>,
}

/// Does `head` look like a text descriptor? (QEMU probes the same header line.)
pub fn is_descriptor(head: &[u8]) -> bool {
    head.starts_with(b"# Disk DescriptorFile")
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

fn parse_hex(key: &str, v: &str) -> Result<u32> {
    u32::from_str_radix(unquote(v), 16)
        .map_err(|_| Error::corrupt(format!("VMDK descriptor: {key}={v:?} is not a hex number")))
}

/// Parse one extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let bad = |why: &str| Error::corrupt(format!("VMDK descriptor extent line {line:?}: {why}"));
    let (head, rest) = match line.find('"') {
        Some(q) => (&line[..q], Some(&line[q + 1..])),
        None => (line, None),
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    if words.len() != 3 {
        return Err(bad("expected access, size and type"));
    }
    let access = match words[0] {
        "RW" => Access::Rw,
        "RDONLY" => Access::RdOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad("unknown access mode")),
    };
    let sectors: u64 = words[1].parse().map_err(|_| bad("bad sector count"))?;
    let kind = match words[2] {
        "SPARSE" | "VMFSSPARSE" => Kind::Sparse,
        "SESPARSE" => Kind::SeSparse,
        "FLAT" | "VMFS" => Kind::Flat,
        "ZERO" => Kind::Zero,
        "VMFSRAW" | "VMFSRDM" => {
            return Err(Error::unsupported(format!(
                "VMDK extent type {} is not supported",
                words[2]
            )))
        }
        _ => return Err(bad("unknown extent type")),
    };
    let (file, offset) = match rest {
        None if kind == Kind::Zero => (String::new(), 0),
        None => return Err(bad("missing file name")),
        Some(r) => {
            let end = r.find('"').ok_or_else(|| bad("unterminated file name"))?;
            let tail = r[end + 1..].trim();
            let offset = if tail.is_empty() {
                0
            } else {
                tail.parse().map_err(|_| bad("bad offset"))?
            };
            (r[..end].to_string(), offset)
        }
    };
    if kind != Kind::Zero && file.is_empty() {
        return Err(bad("empty file name"));
    }
    if matches!(kind, Kind::Sparse | Kind::SeSparse) && offset != 0 {
        return Err(bad("sparse extents take no offset"));
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        type_name: words[2].to_string(),
        file,
        offset,
    })
}

impl Descriptor {
    pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
        if bytes.len() as u64 > MAX_DESCRIPTOR {
            return Err(Error::corrupt("VMDK descriptor larger than 1 MiB"));
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let text = std::str::from_utf8(&bytes[..end])
            .map_err(|_| Error::corrupt("VMDK descriptor is not UTF-8 text"))?
            .to_string();
        let mut d = Descriptor {
            text: String::new(),
            cid: 0,
            parent_cid: NO_PARENT,
            create_type: String::new(),
            parent_hint: None,
            extents: Vec::new(),
            ddb: Vec::new(),
        };
        let mut seen_cid = false;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("RW ")
                || line.starts_with("RDONLY ")
                || line.starts_with("NOACCESS ")
            {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(Error::corrupt(format!(
                        "VMDK descriptor has more than {MAX_EXTENTS} extents"
                    )));
                }
                d.extents.push(parse_extent(line)?);
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                continue; // VMware ignores lines it does not know
            };
            let k = k.trim();
            match k {
                "CID" => {
                    d.cid = parse_hex(k, v)?;
                    seen_cid = true;
                }
                "parentCID" => d.parent_cid = parse_hex(k, v)?,
                "createType" => d.create_type = unquote(v).to_string(),
                "parentFileNameHint" => d.parent_hint = Some(unquote(v).to_string()),
                _ if k.starts_with("ddb.") => d.ddb.push((k.to_string(), unquote(v).to_string())),
                _ => {}
            }
        }
        if d.create_type.is_empty() {
            return Err(Error::corrupt("VMDK descriptor names no createType"));
        }
        if !seen_cid {
            return Err(Error::corrupt("VMDK descriptor has no CID"));
        }
        if d.extents.is_empty() {
            return Err(Error::corrupt("VMDK descriptor lists no extents"));
        }
        if d.parent_hint.as_deref() == Some("") {
            d.parent_hint = None;
        }
        d.text = text;
        Ok(d)
    }

    /// Total size in sectors (checked).
    pub fn sectors(&self) -> Result<u64> {
        self.extents.iter().try_fold(0u64, |acc, e| {
            acc.checked_add(e.sectors)
                .filter(|&s| s <= super::MAX_SECTORS)
                .ok_or_else(|| Error::corrupt("VMDK extents add up to more than 64 TiB"))
        })
    }

    pub fn ddb(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The descriptor text with `CID=` set to `cid` (same length when the old value was 8 hex
    /// digits, as QEMU and VMware write it).
    pub fn with_cid(&self, cid: u32) -> String {
        let mut out = String::with_capacity(self.text.len());
        for line in self.text.split_inclusive('\n') {
            if line.trim_start().starts_with("CID=") {
                let nl = &line[line.trim_end().len()..];
                out.push_str(&format!("CID={cid:08x}{nl}"));
            } else {
                out.push_str(line);
            }
        }
        out
    }
}

/// What `create` writes: the descriptor text QEMU writes for the same options.
pub struct NewDescriptor<'a> {
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: &'a str,
    pub parent_hint: Option<&'a str>,
    /// (sectors, "SPARSE"/"FLAT", file name)
    pub extents: Vec<(u64, &'static str, String)>,
    pub hw_version: &'a str,
    pub adapter_type: &'a str,
    pub sectors: u64,
}

impl NewDescriptor<'_> {
    pub fn render(&self) -> String {
        let mut s = format!(
            "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID={:08x}\ncreateType=\"{}\"\n",
            self.cid, self.parent_cid, self.create_type
        );
        if let Some(p) = self.parent_hint {
            s.push_str(&format!("parentFileNameHint=\"{p}\"\n"));
        }
        s.push_str("\n# Extent description\n");
        for (sectors, kind, file) in &self.extents {
            let off = if *kind == "FLAT" { " 0" } else { "" };
            s.push_str(&format!("RW {sectors} {kind} \"{file}\"{off}\n"));
        }
        // The geometry QEMU writes: 16 heads, 63 sectors, cylinders capped at 16383.
        let cyl = (self.sectors / (16 * 63)).min(16383);
        s.push_str(&format!(
            "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\n\
             ddb.geometry.cylinders = \"{cyl}\"\nddb.geometry.heads = \"16\"\n\
             ddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\n\
             ddb.toolsVersion = \"2147483647\"\n",
            self.hw_version, self.adapter_type
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_extents_keys_and_rewrites_cid() {
        let t = "# Disk DescriptorFile\nversion=1\nCID=0000abcd\nparentCID=12345678\n\
                 createType=\"twoGbMaxExtentFlat\"\nparentFileNameHint=\"p.vmdk\"\n\
                 RW 100 FLAT \"a b-f001.vmdk\" 8\nRDONLY 50 ZERO\nNOACCESS 2 SPARSE \"s.vmdk\"\n\
                 ddb.adapterType = \"lsilogic\"\n";
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        assert_eq!((d.cid, d.parent_cid), (0xabcd, 0x12345678));
        assert_eq!(d.parent_hint.as_deref(), Some("p.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file, "a b-f001.vmdk");
        assert_eq!(d.extents[0].offset, 8);
        assert_eq!(d.extents[1].kind, Kind::Zero);
        assert_eq!(d.extents[2].access, Access::NoAccess);
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(d.sectors().unwrap(), 152);
        let n = d.with_cid(0xdeadbeef);
        assert_eq!(n.len(), t.len());
        assert_eq!(Descriptor::parse(n.as_bytes()).unwrap().cid, 0xdeadbeef);
    }

    #[test]
    fn esx_delta_extent_types() {
        let t = "# Disk DescriptorFile\nCID=fffffffe\nparentCID=1a2b3c4d\n\
                 createType=\"vmfsSparse\"\nRW 8 VMFSSPARSE \"d-delta.vmdk\"\n\
                 RW 8 SESPARSE \"d-sesparse.vmdk\"\n";
        let d = Descriptor::parse(t.as_bytes()).unwrap();
        let kinds: Vec<Kind> = d.extents.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::Sparse, Kind::SeSparse]);
        assert_eq!(d.extents[0].type_name, "VMFSSPARSE");
        for bad in ["RW 8 SESPARSE \"x\" 4", "RW 8 VMFSRDM \"x\""] {
            let t = format!("createType=\"x\"\nCID=1\n{bad}\n");
            assert!(Descriptor::parse(t.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn refuses_bad_lines() {
        for bad in [
            "createType=\"x\"\nCID=1\nRW 1 FLAT\n",
            "createType=\"x\"\nCID=1\nRW x FLAT \"f\"\n",
            "createType=\"x\"\nCID=1\nRW 1 FLAT \"f\n",
            "createType=\"x\"\nCID=zz\nRW 1 FLAT \"f\"\n",
            "createType=\"x\"\nCID=1\n",
            "CID=1\nRW 1 FLAT \"f\"\n",
            "createType=\"x\"\nCID=1\nRW 1 SPARSE \"f\" 3\n",
        ] {
            assert!(Descriptor::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        let many = format!("createType=\"x\"\nCID=1\n{}", "RW 1 ZERO\n".repeat(5000));
        assert!(Descriptor::parse(many.as_bytes()).is_err());
    }
}
