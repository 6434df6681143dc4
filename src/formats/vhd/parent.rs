//! Parent locators of differencing VHDs: the dynamic header holds eight 24-byte entries, each
//! pointing at a platform-specific path somewhere in the file.
//!
//! ```text
//!   entry: platform code (4 chars) | data space (512-byte sectors) | data length (bytes)
//!          | reserved | data offset (u64)
//!   "W2ru" relative Windows path, UTF-16LE     ".\parent.vhd"
//!   "W2ku" absolute Windows path, UTF-16LE     "C:\vms\parent.vhd"
//!   "MacX" file URL, UTF-8                     "file://localhost/vms/parent.vhd"
//! ```
//!
//! The engine tries the names in the order `candidates` returns them (relative first, as a disk
//! moved together with its parent keeps working) and the first one that exists wins.

use crate::error::{Error, Result};
use crate::formats::{be32, be64};

pub const LOCATORS: usize = 8;
pub const LOCATOR_AT: usize = 576;
/// Longest locator read (a 32 Ki-character Windows path in UTF-16).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

pub const W2RU: [u8; 4] = *b"W2ru";
pub const W2KU: [u8; 4] = *b"W2ku";
pub const MACX: [u8; 4] = *b"MacX";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Locator {
    pub code: [u8; 4],
    pub data_space: u32,
    pub data_len: u32,
    pub offset: u64,
}

impl Locator {
    pub fn parse(b: &[u8]) -> Locator {
        Locator {
            code: b[0..4].try_into().expect("4 bytes"),
            data_space: be32(b, 4),
            data_len: be32(b, 8),
            offset: be64(b, 16),
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0..4].copy_from_slice(&self.code);
        b[4..8].copy_from_slice(&self.data_space.to_be_bytes());
        b[8..12].copy_from_slice(&self.data_len.to_be_bytes());
        b[12..16].fill(0);
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }
    pub fn is_used(&self) -> bool {
        self.code != [0; 4]
    }
    /// Bytes reserved for the path: the specification counts sectors, some writers bytes.
    pub fn space_bytes(&self) -> u64 {
        let s = self.data_space as u64;
        if s < 512 {
            s * 512
        } else {
            s
        }
    }
}

pub fn utf16_decode(b: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

pub fn utf16_encode(s: &str, big_endian: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| {
            if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            }
        })
        .collect()
}

/// A Windows path as a local one: backslashes become slashes, a drive letter is dropped.
fn windows_to_local(p: &str) -> String {
    let p = p.trim_end_matches('\0');
    let p = match p.as_bytes() {
        [d, b':', ..] if d.is_ascii_alphabetic() => &p[2..],
        _ => p,
    };
    p.replace('\\', "/")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The local path a locator names, None when its platform is not one imgfs reads.
pub fn decode(code: [u8; 4], data: &[u8]) -> Option<String> {
    let s = match code {
        W2RU | W2KU => windows_to_local(&utf16_decode(data, false)),
        MACX => {
            let url = String::from_utf8_lossy(data);
            let url = url.trim_end_matches('\0');
            let rest = url.strip_prefix("file://")?;
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            percent_decode(path)
        }
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// Names to try for the parent, best first: relative locators, absolute ones, then the file
/// name alone (from each absolute path and from the header's parent name) in the child's
/// directory.
pub fn candidates(
    read: &dyn Fn(&Locator) -> Result<Vec<u8>>,
    locs: &[Locator],
    name: &str,
) -> Result<Vec<String>> {
    let mut rel = vec![];
    let mut abs = vec![];
    for l in locs.iter().filter(|l| l.is_used()) {
        if !matches!(l.code, W2RU | W2KU | MACX) {
            continue;
        }
        let data = read(l)?;
        if let Some(p) = decode(l.code, &data) {
            if l.code == W2RU {
                rel.push(p);
            } else {
                abs.push(p);
            }
        }
    }
    let mut out: Vec<String> = vec![];
    let base = |p: &str| p.rsplit('/').next().unwrap_or("").to_string();
    let bases: Vec<String> = abs.iter().map(|p| base(p)).collect();
    for c in rel
        .into_iter()
        .chain(abs)
        .chain(bases)
        .chain(std::iter::once(windows_to_local(name)).map(|p| base(&p)))
    {
        if !c.is_empty() && !out.contains(&c) {
            out.push(c);
        }
    }
    if out.is_empty() {
        return Err(Error::corrupt(
            "differencing VHD names no parent (no W2ru, W2ku or MacX locator and no parent name)",
        ));
    }
    Ok(out)
}

/// Windows relative path for `name` (as given to `create -b`): "./" prefix, backslashes.
pub fn w2ru_path(name: &str) -> String {
    let n = name.replace('/', "\\");
    if n.starts_with(".\\") || n.starts_with("..\\") {
        n
    } else {
        format!(".\\{n}")
    }
}

/// A file URL for an absolute local path (MacX), unsafe bytes percent-encoded.
pub fn macx_url(abs: &str) -> String {
    let mut s = String::from("file://localhost");
    for &c in abs.as_bytes() {
        if c.is_ascii_alphanumeric() || b"/-._~".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_platform() {
        let w = utf16_encode(".\\sub\\base.vhd", false);
        assert_eq!(decode(W2RU, &w).unwrap(), "./sub/base.vhd");
        let w = utf16_encode("C:\\vms\\base.vhd", false);
        assert_eq!(decode(W2KU, &w).unwrap(), "/vms/base.vhd");
        let u = macx_url("/tmp/a b/base.vhd");
        assert_eq!(u, "file://localhost/tmp/a%20b/base.vhd");
        assert_eq!(decode(MACX, u.as_bytes()).unwrap(), "/tmp/a b/base.vhd");
        assert_eq!(decode(*b"Mac ", b"x"), None);
        assert_eq!(w2ru_path("base.vhd"), ".\\base.vhd");
        assert_eq!(w2ru_path("../x/base.vhd"), "..\\x\\base.vhd");
    }

    #[test]
    fn candidate_order() {
        let locs = [
            Locator {
                code: W2KU,
                data_space: 1,
                data_len: 0,
                offset: 0,
            },
            Locator {
                code: W2RU,
                data_space: 1,
                data_len: 0,
                offset: 1,
            },
        ];
        let read = |l: &Locator| -> Result<Vec<u8>> {
            Ok(utf16_encode(
                if l.offset == 0 {
                    "D:\\x\\p.vhd"
                } else {
                    ".\\p.vhd"
                },
                false,
            ))
        };
        let c = candidates(&read, &locs, "p.vhd").unwrap();
        assert_eq!(c, vec!["./p.vhd", "/x/p.vhd", "p.vhd"]);
        assert!(candidates(&read, &[], "").is_err());
    }
}
