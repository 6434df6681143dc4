//! The internal snapshot table.
//!
//! ```text
//!   entry: 0 l1_table_offset u64 | 8 l1_size u32 | 12 id_len u16 | 14 name_len u16
//!          16 date_sec u32 | 20 date_nsec u32 | 24 vm_clock_nsec u64 | 32 vm_state_size u32
//!          36 extra_size u32 | 40 extra (vm_state_size_large u64, disk_size u64, icount u64)
//!          | id | name | padding to 8
//! ```

use super::header::{Header, MAX_L1_BYTES};
use crate::error::{Error, Result};
use crate::format::SnapshotInfo;
use crate::formats::{be32, be64};
use crate::host::HostFile;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: u64,
}

impl Snapshot {
    pub fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            virtual_size: self.disk_size,
            vm_state_size: self.vm_state_size,
            date_sec: u64::from(self.date_sec),
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
        }
    }
}

/// Largest snapshot table imgfs reads.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// Parse the snapshot table; returns the snapshots and the table's size in bytes.
pub fn read_table(file: &HostFile, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let file_len = file.len()?;
    let cs = h.cluster_size();
    let avail = file_len
        .saturating_sub(h.snapshots_offset)
        .min(MAX_TABLE_BYTES);
    let mut buf = vec![0u8; avail as usize];
    file.read_exact_at(&mut buf, h.snapshots_offset)?;
    let mut pos = 0usize;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for i in 0..h.nb_snapshots {
        let at = h.snapshots_offset + pos as u64;
        let short = || Error::corrupt(format!("snapshot table entry {i} runs past its end")).at(at);
        if pos + 40 > buf.len() {
            return Err(short());
        }
        let e = &buf[pos..];
        let id_len = usize::from(u16::from_be_bytes([e[12], e[13]]));
        let name_len = usize::from(u16::from_be_bytes([e[14], e[15]]));
        let extra = be32(e, 36) as usize;
        if extra > 1024 {
            return Err(
                Error::corrupt(format!("snapshot {i}: extra data of {extra} bytes")).at(at),
            );
        }
        let total = 40 + extra + id_len + name_len;
        if pos + total > buf.len() {
            return Err(short());
        }
        let mut s = Snapshot {
            l1_table_offset: be64(e, 0),
            l1_size: be32(e, 8),
            id: String::from_utf8_lossy(&e[40 + extra..40 + extra + id_len]).into_owned(),
            name: String::from_utf8_lossy(&e[40 + extra + id_len..total]).into_owned(),
            date_sec: be32(e, 16),
            date_nsec: be32(e, 20),
            vm_clock_nsec: be64(e, 24),
            vm_state_size: u64::from(be32(e, 32)),
            disk_size: h.size,
        };
        if extra >= 8 {
            s.vm_state_size = be64(e, 40);
        }
        if extra >= 16 {
            s.disk_size = be64(e, 48);
        }
        let l1_bytes = u64::from(s.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES
            || !s.l1_table_offset.is_multiple_of(cs)
            || (s.l1_size > 0
                && (s.l1_table_offset == 0
                    || s.l1_table_offset.saturating_add(l1_bytes) > file_len))
        {
            return Err(Error::corrupt(format!(
                "snapshot {:?}: L1 table at {:#x} ({} entries) is invalid",
                s.name, s.l1_table_offset, s.l1_size
            ))
            .at(at));
        }
        let need = Header::l1_entries_for(s.disk_size, h.cluster_bits, h.l2_entries());
        if need > u64::from(s.l1_size) && s.disk_size > 0 {
            // QEMU tolerates this for VM state areas; clamp the view to what the L1 maps.
            s.disk_size = u64::from(s.l1_size) * h.l2_entries() * cs;
        }
        out.push(s);
        pos += total.div_ceil(8) * 8;
    }
    Ok((out, pos as u64))
}

/// Snapshot by id, then by name.
pub fn find<'a>(snaps: &'a [Snapshot], key: &str) -> Option<&'a Snapshot> {
    snaps
        .iter()
        .find(|s| s.id == key)
        .or_else(|| snaps.iter().find(|s| s.name == key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FaultFile;
    use std::path::Path;

    /// A v3 image (64 KiB clusters) with one snapshot entry at 0x40000 and its L1 at 0x50000.
    fn image(patch: impl Fn(&mut [u8])) -> Result<Vec<Snapshot>> {
        let mut b = vec![0u8; 0x60000];
        b[0..4].copy_from_slice(super::super::header::MAGIC);
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 4, 3);
        put32(&mut b, 20, 16);
        put64(&mut b, 24, 1 << 30);
        put32(&mut b, 36, 2);
        put64(&mut b, 40, 0x30000);
        put64(&mut b, 48, 0x10000);
        put32(&mut b, 56, 1);
        put32(&mut b, 60, 1);
        put64(&mut b, 64, 0x40000);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, 104);
        let e = 0x40000;
        put64(&mut b, e, 0x50000);
        put32(&mut b, e + 8, 2);
        b[e + 12..e + 14].copy_from_slice(&1u16.to_be_bytes());
        b[e + 14..e + 16].copy_from_slice(&4u16.to_be_bytes());
        put32(&mut b, e + 36, 16);
        put64(&mut b, e + 48, 1 << 30);
        b[e + 56..e + 61].copy_from_slice(b"1snap");
        patch(&mut b);
        let f = FaultFile::new(b);
        let h = f.host_file(Path::new("mem"), false);
        let hdr = super::super::read_header(&h)?;
        read_table(&h, &hdr).map(|(s, _)| s)
    }

    #[test]
    fn parses_and_finds() {
        let s = image(|_| {}).unwrap();
        assert_eq!((s[0].id.as_str(), s[0].name.as_str()), ("1", "snap"));
        assert_eq!(s[0].disk_size, 1 << 30);
        assert!(find(&s, "snap").is_some() && find(&s, "1").is_some() && find(&s, "x").is_none());
    }

    #[test]
    fn hostile_entries_are_errors() {
        let e = 0x40000;
        type Patch = Box<dyn Fn(&mut [u8])>;
        let cases: [(&str, Patch); 5] = [
            (
                "l1 past eof",
                Box::new(move |b| b[e..e + 8].copy_from_slice(&0x70000u64.to_be_bytes())),
            ),
            (
                "l1 in header",
                Box::new(move |b| b[e..e + 8].copy_from_slice(&0u64.to_be_bytes())),
            ),
            (
                "l1 huge",
                Box::new(move |b| b[e + 8..e + 12].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
            (
                "extra huge",
                Box::new(move |b| b[e + 36..e + 40].copy_from_slice(&u32::MAX.to_be_bytes())),
            ),
            (
                "table unaligned",
                Box::new(|b| b[64..72].copy_from_slice(&0x40008u64.to_be_bytes())),
            ),
        ];
        for (what, f) in cases {
            assert!(image(f).is_err(), "{what}");
        }
    }
}
