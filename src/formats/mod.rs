//! The format registry. Adding a format is one module plus one line in `FORMATS`.

use crate::error::{Error, Result};
use crate::image::Format;

pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vhdx;
pub mod vmdk;

/// Every known format, probed in this order, one per line.
static FORMATS: &[&dyn Format] = &[
    &qcow2::Qcow2,
    &qcow::Qcow,
    &qed::Qed,
    &vhdx::Vhdx,
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
        .find(|f| f.name() == name)
        .ok_or_else(|| {
            let known: Vec<_> = FORMATS.iter().map(|f| f.name()).collect();
            Error::invalid(format!(
                "unknown format {name:?} (known: {})",
                known.join(", ")
            ))
        })
}

/// Magics of image formats QEMU would probe, including ones imgfs does not read. A guest must
/// not be able to plant any of them at the start of a probed raw image.
const FOREIGN_MAGICS: &[(usize, &[u8], &str)] = &[
    (0, b"QFI\xfb", "qcow/qcow2"),
    (0, b"QED\0", "qed"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"conectix", "vpc"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
];

/// The image format `head` would be taken for, by imgfs or by QEMU's probing; None for raw.
pub fn image_magic(head: &[u8]) -> Option<&'static str> {
    let ours = probe(head);
    if ours.name() != "raw" {
        return Some(ours.name());
    }
    FOREIGN_MAGICS
        .iter()
        .find(|(at, magic, _)| head.get(*at..*at + magic.len()) == Some(*magic))
        .map(|(_, _, name)| *name)
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
