//! The format registry. Adding a format is one module plus one line in `FORMATS`.

use crate::error::{Error, Result};
use crate::format::Format;

pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

/// Every known format, probed in this order, one per line.
static FORMATS: &[&dyn Format] = &[
    &qcow2::Qcow2,
    &qcow::Qcow,
    &qed::Qed,
    &vhdx::Vhdx,
    &vhd::Vpc,
    &vdi::Vdi,
    &vmdk::Vmdk,
    &raw::Raw, // no magic: must stay last
];

pub fn all() -> &'static [&'static dyn Format] {
    FORMATS
}

/// The format whose magic `head` carries; raw when none does.
pub fn probe(head: &[u8]) -> &'static dyn Format {
    FORMATS
        .iter()
        .copied()
        .find(|f| f.name() != "raw" && f.probe(head))
        .unwrap_or(&raw::Raw)
}

pub fn by_name(name: &str) -> Result<&'static dyn Format> {
    FORMATS
        .iter()
        .copied()
        .find(|f| f.name() == name || f.aliases().contains(&name))
        .ok_or_else(|| {
            let known: Vec<_> = FORMATS.iter().map(|f| f.name()).collect();
            Error::invalid(format!(
                "unknown format {name:?} (known: {})",
                known.join(", ")
            ))
        })
}

/// Where a foreign format's signature sits.
#[derive(Clone, Copy)]
enum At {
    /// At this offset from the start of the file.
    Head(usize),
    /// At this offset back from the end of the file (trailers: DMG's koly block, a fixed VHD's footer).
    Tail(usize),
}

/// A container format QEMU (or another tool) would recognise by this signature.
struct Foreign {
    at: At,
    magic: &'static [u8],
    /// What the user is told ("VMDK").
    label: &'static str,
    /// Registry names that serve it: once a format with one of these names is in `FORMATS`,
    /// its files are opened with it instead of being refused. QEMU's name first.
    names: &'static [&'static str],
    /// Appended to the refusal (what to open instead).
    hint: &'static str,
}

const fn head(
    at: usize,
    magic: &'static [u8],
    label: &'static str,
    names: &'static [&'static str],
) -> Foreign {
    Foreign {
        at: At::Head(at),
        magic,
        label,
        names,
        hint: "",
    }
}

/// A piece of a multi-file image that is served only through the file naming it.
const fn part(magic: &'static [u8], label: &'static str, hint: &'static str) -> Foreign {
    Foreign {
        at: At::Head(0),
        magic,
        label,
        names: &[],
        hint,
    }
}

/// Signatures of image containers, including ones imgfs does not read. A file carrying one is
/// never exposed as a raw disk unless the user says `--format raw` (writing into a VMDK file's
/// bytes as if they were the disk corrupts the image), and a guest must not be able to plant
/// one at the start of a probed raw image.
const FOREIGN: &[Foreign] = &[
    head(
        0,
        b"QFI\xfb",
        "qcow/qcow2 (unsupported version)",
        &["qcow2", "qcow"],
    ),
    head(0, b"QED\0", "QED", &["qed"]),
    head(0, b"vhdxfile", "VHDX", &["vhdx"]),
    head(0, b"KDMV", "VMDK", &["vmdk"]),
    // ESX delta extents (vmfsSparse COWD, seSparse) are read through their descriptor, which
    // names their parent; QEMU fails on a bare COWD file too (it finds no CID in it).
    part(
        b"COWD",
        "VMDK (ESX COWD delta extent)",
        " by itself: open the descriptor .vmdk that names it",
    ),
    part(
        b"\xbe\xba\xfe\xca\0\0\0\0",
        "VMDK (ESXi seSparse delta extent)",
        " by itself: open the descriptor .vmdk that names it",
    ),
    head(0, b"# Disk DescriptorFile", "VMDK descriptor", &["vmdk"]),
    head(0, b"conectix", "VHD (vpc)", &["vpc", "vhd"]),
    head(0x40, b"\x7f\x10\xda\xbe", "VDI", &["vdi"]),
    head(
        0,
        b"<<< Oracle VM VirtualBox Disk Image >>>",
        "VDI",
        &["vdi"],
    ),
    head(0, b"<<< Sun xVM VirtualBox Disk Image >>>", "VDI", &["vdi"]),
    head(0, b"<<< Sun VirtualBox Disk Image >>>", "VDI", &["vdi"]),
    head(0, b"<<< innotek VirtualBox Disk Image >>>", "VDI", &["vdi"]),
    head(0, b"LUKS\xba\xbe", "LUKS encrypted volume", &["luks"]),
    head(0, b"WithoutFreeSpace", "Parallels", &["parallels"]),
    head(0, b"WithouFreSpacExt", "Parallels", &["parallels"]),
    head(0, b"Bochs Virtual HD Image", "Bochs", &["bochs"]),
    head(0, b"#!/bin/sh\n#V2.0 Format", "cloop", &["cloop"]),
    Foreign {
        at: At::Tail(512),
        magic: b"conectix",
        label: "fixed VHD (vpc)",
        names: &["vpc", "vhd"],
        hint: "",
    },
    Foreign {
        at: At::Tail(512),
        magic: b"koly",
        label: "DMG",
        names: &["dmg"],
        hint: "",
    },
];

impl Foreign {
    fn matches(&self, head: &[u8], tail: &[u8]) -> bool {
        let found = match self.at {
            At::Head(at) => head.get(at..),
            At::Tail(back) => tail.len().checked_sub(back).and_then(|i| tail.get(i..)),
        };
        found.is_some_and(|b| b.starts_with(self.magic))
    }

    /// The registered format that serves this container, if any.
    fn served_by(&self) -> Option<&'static dyn Format> {
        self.names.iter().find_map(|n| by_name(n).ok())
    }
}

/// Bytes read from the end of a file to find trailers.
pub const TAIL_LEN: usize = 4096;

/// The format to open a file with, from its first bytes `head` and its last bytes `tail`:
/// a registered format whose probe accepts `head` first; then a container signature, served
/// by the registered format of that name or else refused with an error naming the container;
/// raw when nothing matches.
pub fn detect(head: &[u8], tail: &[u8]) -> Result<&'static dyn Format> {
    let ours = probe(head);
    if ours.name() != "raw" {
        return Ok(ours);
    }
    match FOREIGN.iter().find(|f| f.matches(head, tail)) {
        None => Ok(&raw::Raw),
        Some(f) => f.served_by().ok_or_else(|| {
            Error::unsupported(format!(
                "{} image: imgfs cannot serve this format{} (--format raw exposes the file itself)",
                f.label, f.hint
            ))
        }),
    }
}

/// `detect` on a host file: reads its first and last 4 KiB.
pub fn detect_file(file: &crate::host::HostFile) -> Result<&'static dyn Format> {
    let mut head = vec![0u8; TAIL_LEN];
    let n = file.read_at(&mut head, 0)?;
    head.truncate(n);
    let len = file.len()?;
    let tail_at = len.saturating_sub(TAIL_LEN as u64);
    let mut tail = vec![0u8; (len - tail_at) as usize];
    let n = file.read_at(&mut tail, tail_at)?;
    tail.truncate(n);
    detect(&head, &tail).map_err(|e| e.in_file(file.path()))
}

/// The image format `head` would be taken for, by imgfs or by QEMU's probing; None for raw.
pub fn image_magic(head: &[u8]) -> Option<&'static str> {
    let ours = probe(head);
    if ours.name() != "raw" {
        return Some(ours.name());
    }
    FOREIGN
        .iter()
        .find(|f| matches!(f.at, At::Head(_)) && f.matches(head, &[]))
        .map(|f| f.label)
}

/// How far from either end of a file the signatures in `image_magic` and `trailer_magic` reach:
/// the raw-write guard checks writes touching the first or the last `MAGIC_SPAN` bytes.
pub const MAGIC_SPAN: usize = 512;

/// The container a file ending in `tail` (its last `MAGIC_SPAN` bytes or more) would be taken
/// for because of a trailer (a fixed VHD's footer, DMG's koly block); None when none is there.
pub fn trailer_magic(tail: &[u8]) -> Option<&'static str> {
    FOREIGN
        .iter()
        .find(|f| matches!(f.at, At::Tail(_)) && f.matches(&[], tail))
        .map(|f| f.label)
}

/// Read a big-endian u64/u32/u16 from `b` at `at` (callers have checked the length).
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(at: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[at..at + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn containers_are_refused_by_name_and_registered_formats_win() {
        let zeros = vec![0u8; 4096];
        assert_eq!(detect(&zeros, &zeros).unwrap().name(), "raw");
        let luks = with(0, b"LUKS\xba\xbe");
        let e = detect(&luks, &zeros).err().expect("refused");
        assert!(e.to_string().starts_with("LUKS"), "{e}");
        // Registered formats serve their containers: VDI by its head, a fixed VHD by its
        // trailing footer (looked for at the end), DMG (not registered) is refused.
        let vdi = with(0x40, b"\x7f\x10\xda\xbe");
        assert_eq!(detect(&vdi, &zeros).unwrap().name(), "vdi");
        let fixed = with(4096 - 512, b"conectix");
        assert_eq!(detect(&zeros, &fixed).unwrap().name(), "vpc");
        let dmg = with(4096 - 512, b"koly");
        assert!(detect(&zeros, &dmg)
            .err()
            .expect("refused")
            .to_string()
            .contains("DMG"));
        // The same bytes elsewhere are just data.
        assert_eq!(detect(&zeros, &with(0, b"koly")).unwrap().name(), "raw");
        // A signature whose format is registered is served by it, never refused: a qcow2 magic
        // with a version qcow2's probe rejects goes to qcow2 (whose open then says why).
        let v9 = {
            let mut b = with(0, b"QFI\xfb");
            b[7] = 9;
            b
        };
        assert_eq!(detect(&v9, &zeros).unwrap().name(), "qcow2");
        // image_magic (the raw-write guard) sees start-of-file signatures only.
        assert_eq!(image_magic(&with(0, b"KDMV")), Some("vmdk"));
        assert_eq!(
            image_magic(&with(0, b"COWD")),
            Some("VMDK (ESX COWD delta extent)")
        );
        let cowd = detect(&with(0, b"COWD"), &zeros).err().expect("refused");
        assert!(cowd.to_string().contains("open the descriptor"), "{cowd}");
        let se = detect(&with(0, b"\xbe\xba\xfe\xca\0\0\0\0"), &zeros);
        assert!(se.err().expect("refused").to_string().contains("seSparse"));
        assert_eq!(image_magic(&fixed), None);
        // trailer_magic (the raw-write guard for the last sector) sees trailers only.
        assert_eq!(trailer_magic(&fixed), Some("fixed VHD (vpc)"));
        assert_eq!(trailer_magic(&dmg), Some("DMG"));
        assert_eq!(trailer_magic(&with(0, b"conectix")), None);
    }

    #[test]
    fn every_signature_lies_within_the_guarded_span() {
        for f in FOREIGN {
            match f.at {
                At::Head(at) => assert!(at + f.magic.len() <= MAGIC_SPAN, "{}", f.label),
                At::Tail(back) => assert!(back <= MAGIC_SPAN, "{}", f.label),
            }
        }
    }
}
