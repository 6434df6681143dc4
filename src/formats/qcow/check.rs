//! qcow v1 consistency check (QEMU has none for this format): every L2 table and data cluster
//! inside the file and clear of the header and L1 table, no data cluster referenced twice, and
//! compressed clusters inside the file. Repair (`-r all`) clears invalid entries, so the guest
//! sees the backing file (or zeros) there. qcow has no refcounts, so nothing counts as a leak.

use super::header::{Entry, Header};
use crate::error::Result;
use crate::format::{CheckReport, Repair};
use crate::host::HostFile;
use std::collections::HashSet;

pub fn check(file: &HostFile, h: &Header, repair: Repair) -> Result<CheckReport> {
    let file_len = file.len()?;
    let cs = h.cluster_size();
    let fix = repair == Repair::All;
    let meta = MetaRanges::of(h);
    let mut r = CheckReport {
        total_clusters: h.virtual_size().div_ceil(cs),
        ..Default::default()
    };
    let mut l1b = vec![0u8; (h.l1_entries() * 8) as usize];
    file.read_exact_at(&mut l1b, h.l1_table_offset)?;
    let mut l1: Vec<u64> = l1b
        .chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let mut l1_changed = false;
    let mut seen = HashSet::new();
    let scan = Scan {
        file,
        h,
        file_len,
        meta,
        fix,
    };
    for (i, l2_off) in l1.iter_mut().enumerate() {
        if *l2_off == 0 {
            continue;
        }
        let valid = !meta.overlaps(*l2_off, h.l2_bytes())
            && l2_off
                .checked_add(h.l2_bytes())
                .is_some_and(|e| e <= file_len);
        if !valid || !seen.insert(*l2_off) {
            r.corruptions += 1;
            r.messages.push(format!(
                "L1 entry {i}: L2 table offset {:#x} invalid or used twice",
                *l2_off
            ));
            if fix && !valid {
                *l2_off = 0;
                l1_changed = true;
                r.corruptions_fixed += 1;
            }
            continue;
        }
        check_l2(&scan, *l2_off, &mut seen, &mut r)?;
    }
    if fix && l1_changed {
        file.sync()?;
        let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&bytes, h.l1_table_offset)?;
    }
    if repair != Repair::None {
        file.sync()?;
    }
    Ok(r)
}

/// Where the header, backing file name and L1 table lie: nothing may point into them. The L1
/// table follows the header unless a resize moved it to the end of the file.
#[derive(Clone, Copy)]
struct MetaRanges {
    front_end: u64,
    l1: (u64, u64),
}

impl MetaRanges {
    fn of(h: &Header) -> MetaRanges {
        let name_end = h.backing_file_offset + u64::from(h.backing_file_size);
        MetaRanges {
            front_end: name_end.max(super::header::HEADER_LEN as u64),
            l1: (h.l1_table_offset, h.l1_table_offset + h.l1_entries() * 8),
        }
    }
    fn overlaps(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len);
        off < self.front_end || (off < self.l1.1 && end > self.l1.0)
    }
}

/// What every L2 table of one check is judged against.
#[derive(Clone, Copy)]
struct Scan<'a> {
    file: &'a HostFile,
    h: &'a Header,
    file_len: u64,
    meta: MetaRanges,
    /// Clear bad entries (repair).
    fix: bool,
}

fn check_l2(scan: &Scan, l2_off: u64, seen: &mut HashSet<u64>, r: &mut CheckReport) -> Result<()> {
    let Scan {
        file,
        h,
        file_len,
        meta,
        fix,
    } = *scan;
    let cs = h.cluster_size();
    let mut t = vec![0u8; h.l2_bytes() as usize];
    file.read_exact_at(&mut t, l2_off)?;
    let mut changed = false;
    for j in 0..t.len() / 8 {
        let e = u64::from_be_bytes(t[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
        if e == 0 {
            continue;
        }
        r.allocated_clusters += 1;
        let (off, len, shareable) = match Entry::decode(e, h.cluster_bits as u32) {
            Entry::Compressed { off, size } => (off, size, true),
            _ => (e, cs, false),
        };
        let inside = !meta.overlaps(off, len.max(1))
            && len > 0
            && off.checked_add(len).is_some_and(|end| {
                // A data cluster may end past EOF (reads as zeros); compressed data may not.
                if shareable {
                    end <= file_len
                } else {
                    off < file_len
                }
            });
        // Compressed clusters pack several into one host cluster: only plain ones are unique.
        let twice = inside && !shareable && !seen.insert(off);
        if inside && !twice {
            continue;
        }
        r.corruptions += 1;
        r.messages.push(format!(
            "L2 table {l2_off:#x} entry {j}: {e:#x} {}",
            if twice {
                "referenced twice"
            } else {
                "points outside the file or into metadata"
            }
        ));
        if fix && !twice {
            t[j * 8..j * 8 + 8].fill(0);
            changed = true;
            r.corruptions_fixed += 1;
        }
    }
    if changed {
        file.write_all_at(&t, l2_off)?;
    }
    Ok(())
}
