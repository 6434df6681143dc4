//! The format registry. Adding a format is one module plus one line in `FORMATS`.

use crate::error::{Error, Result};
use crate::image::Format;

pub mod raw;
pub mod vhdx;

/// Every known format, probed in this order; raw (no magic) must stay last.
static FORMATS: &[&dyn Format] = &[&vhdx::Vhdx, &raw::Raw];

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
