//! OVA appliances: a tar archive (OVF descriptor first, then the disks, usually streamOptimized
//! VMDKs). Each `.vmdk` member is served read-only from inside the archive, without extracting
//! it, through a `HostFile` that is a window onto the tar.
//!
//! ```text
//!  | hdr 512 | appliance.ovf ... | hdr 512 | disk1.vmdk (size, padded to 512) | ... | 2 zero blocks |
//!  header: name[0..100] size[124..136] (octal, or base-256) type[156] "ustar"[257..] prefix[345..500]
//! ```

use crate::error::{Error, Result};
use crate::host::{HostBackend, HostFile};
use std::io;
use std::path::Path;
use std::sync::Arc;

const BLOCK: u64 = 512;
/// Most members read before giving up (an OVA holds a handful).
const MAX_MEMBERS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Byte offset of the member's data in the archive.
    pub offset: u64,
    pub size: u64,
}

/// Does `head` (at least 512 bytes) start with a POSIX/GNU tar header?
pub fn is_tar(head: &[u8]) -> bool {
    head.len() >= 512 && &head[257..262] == b"ustar" && checksum_ok(&head[..512])
}

fn checksum_ok(h: &[u8]) -> bool {
    let want = octal(&h[148..156]);
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    want == Some(sum)
}

fn octal(f: &[u8]) -> Option<u64> {
    let s: String = f
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// A size field: octal, or GNU base-256 (high bit set).
fn size_field(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        if f[1..4].iter().any(|&b| b != 0) {
            return None;
        }
        return Some(f[4..].iter().fold(0u64, |a, &b| (a << 8) | b as u64));
    }
    octal(f)
}

fn cstr(f: &[u8]) -> String {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// Every regular file in the archive, in order (GNU long names and pax `path` records honoured).
pub fn members(file: &HostFile) -> Result<Vec<Member>> {
    let len = file.len()?;
    let bad = |why: String| Error::corrupt(format!("OVA (tar) archive: {why}"));
    let mut out = Vec::new();
    let mut off = 0u64;
    let mut long_name: Option<String> = None;
    let mut h = [0u8; 512];
    while off + BLOCK <= len {
        file.read_exact_at(&mut h, off)?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&h) {
            return Err(bad(format!("bad header checksum at {off:#x}")));
        }
        let size = size_field(&h[124..136]).ok_or_else(|| bad(format!("bad size at {off:#x}")))?;
        let data = off + BLOCK;
        let next = size
            .div_ceil(BLOCK)
            .checked_mul(BLOCK)
            .and_then(|s| data.checked_add(s))
            .filter(|&n| n <= len.div_ceil(BLOCK) * BLOCK)
            .ok_or_else(|| bad(format!("member at {off:#x} runs past the end")))?;
        let text = |max: u64| -> Result<String> {
            let mut b = vec![0u8; size.min(max) as usize];
            file.read_exact_at(&mut b, data)?;
            Ok(cstr(&b))
        };
        match h[156] {
            b'L' => long_name = Some(text(4096)?),
            b'x' => {
                let recs = text(65536)?;
                long_name = recs
                    .lines()
                    .find_map(|l| l.split_once(" path=").map(|(_, p)| p.to_string()));
            }
            b'0' | 0 => {
                let name = long_name.take().unwrap_or_else(|| {
                    let prefix = cstr(&h[345..500]);
                    let n = cstr(&h[..100]);
                    if prefix.is_empty() {
                        n
                    } else {
                        format!("{prefix}/{n}")
                    }
                });
                if out.len() >= MAX_MEMBERS {
                    return Err(bad(format!("more than {MAX_MEMBERS} members")));
                }
                out.push(Member {
                    name,
                    offset: data,
                    size,
                });
            }
            _ => long_name = None,
        }
        off = next;
    }
    Ok(out)
}

/// The VMDK members of an OVA.
pub fn disks(file: &HostFile) -> Result<Vec<Member>> {
    Ok(members(file)?
        .into_iter()
        .filter(|m| m.name.to_ascii_lowercase().ends_with(".vmdk"))
        .collect())
}

/// A read-only window `[offset, offset+size)` of another host file.
struct Window {
    file: HostFile,
    offset: u64,
    size: u64,
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl HostBackend for Window {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = (self.size - off).min(buf.len() as u64) as usize;
        self.file
            .read_at(&mut buf[..n], self.offset + off)
            .map_err(|e| io::Error::other(e.to_string()))
    }
    fn write_all_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn punch_hole(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn allocated(&self) -> io::Result<u64> {
        Ok(self.size)
    }
    fn seek_data(&self, off: u64) -> io::Result<Option<u64>> {
        Ok((off < self.size).then_some(off))
    }
    fn seek_hole(&self, off: u64) -> io::Result<u64> {
        Ok(self.size.max(off))
    }
}

/// A member as a read-only host file named `<archive>/<member file name>` (so it is exposed as
/// `<member stem>.raw`).
pub fn member_file(ova: &HostFile, m: &Member) -> HostFile {
    let base = Path::new(&m.name)
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_else(|| "disk.vmdk".into());
    let w = Window {
        file: ova.clone(),
        offset: m.offset,
        size: m.size,
    };
    HostFile::from_backend(Arc::new(w), &ova.path().join(base), false)
}
