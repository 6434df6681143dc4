//! QED consistency check (the spec's invariants, as qemu-img check reports them): every table
//! and data offset aligned, past the header and inside the file; no cluster referenced twice;
//! unreferenced clusters are leaks. Repair clears invalid entries (corruptions), truncates leaked
//! clusters at the end of the file, and clears NEED_CHECK when nothing corrupt remains.

use super::header::{Header, F_NEED_CHECK};
use super::table;
use crate::error::{Error, Result};
use crate::format::{CheckReport, Repair};
use crate::host::HostFile;

/// Bitmap of referenced clusters, bounded by the file size (at most 128 MiB of bits).
struct Used {
    bits: Vec<u64>,
    n: u64,
}

impl Used {
    fn new(n: u64) -> Result<Used> {
        if n > 1 << 30 {
            return Err(Error::unsupported(format!(
                "QED file of {n} clusters is too large to check"
            )));
        }
        Ok(Used {
            bits: vec![0; n.div_ceil(64) as usize],
            n,
        })
    }
    /// Mark clusters [first, first+count) used; false if any was already used.
    fn mark(&mut self, first: u64, count: u64) -> bool {
        let mut fresh = true;
        for c in first..(first + count).min(self.n) {
            let (w, b) = ((c / 64) as usize, c % 64);
            fresh &= self.bits[w] & (1 << b) == 0;
            self.bits[w] |= 1 << b;
        }
        fresh
    }
    fn is_used(&self, c: u64) -> bool {
        self.bits[(c / 64) as usize] & (1 << (c % 64)) != 0
    }
}

pub fn check(file: &HostFile, h: &Header, repair: Repair) -> Result<CheckReport> {
    let cs = h.cluster_size as u64;
    let file_len = file.len()?;
    let file_size = file_len & !(cs - 1);
    let nclusters = file_size / cs;
    let mut used = Used::new(nclusters)?;
    let mut r = CheckReport {
        total_clusters: h.image_size.div_ceil(cs),
        ..Default::default()
    };
    let fix = repair == Repair::All;
    used.mark(0, h.header_size as u64);
    used.mark(h.l1_table_offset / cs, h.table_size as u64);
    let mut l1 = table::read_table(file, h.l1_table_offset, h.table_bytes())?;
    let mut l1_changed = false;
    for (i, l2_off) in l1.iter_mut().enumerate() {
        if *l2_off == 0 {
            continue;
        }
        if !h.is_table_offset_valid(*l2_off, file_size) {
            r.corruptions += 1;
            r.messages.push(format!(
                "L1 entry {i}: invalid L2 table offset {:#x}",
                *l2_off
            ));
            if fix {
                *l2_off = 0;
                l1_changed = true;
                r.corruptions_fixed += 1;
            }
            continue;
        }
        if !used.mark(*l2_off / cs, h.table_size as u64) {
            r.corruptions += 1;
            r.messages
                .push(format!("L2 table at {:#x} is referenced twice", *l2_off));
            continue;
        }
        check_l2(file, h, *l2_off, file_size, fix, &mut used, &mut r)?;
    }
    if fix && l1_changed {
        file.sync()?;
        file.write_all_at(&table::vec_to_table(&l1), h.l1_table_offset)?;
    }
    count_leaks(file, h, &used, repair, &mut r)?;
    if repair != Repair::None {
        file.sync()?;
        if h.need_check() && r.corruptions == r.corruptions_fixed {
            let mut clean = h.clone();
            clean.features &= !F_NEED_CHECK;
            file.write_all_at(&clean.to_bytes(), 0)?;
            file.sync()?;
        }
    }
    Ok(r)
}

fn check_l2(
    file: &HostFile,
    h: &Header,
    l2_off: u64,
    file_size: u64,
    fix: bool,
    used: &mut Used,
    r: &mut CheckReport,
) -> Result<()> {
    let cs = h.cluster_size as u64;
    let mut t = table::read_table(file, l2_off, h.table_bytes())?;
    let mut changed = false;
    for (j, e) in t.iter_mut().enumerate() {
        if *e <= 1 {
            continue;
        }
        r.allocated_clusters += 1;
        if !h.is_cluster_offset_valid(*e, file_size) {
            r.corruptions += 1;
            r.messages.push(format!(
                "L2 table {l2_off:#x} entry {j}: invalid cluster offset {:#x}",
                *e
            ));
            if fix {
                *e = 0;
                changed = true;
                r.corruptions_fixed += 1;
            }
            continue;
        }
        if !used.mark(*e / cs, 1) {
            r.corruptions += 1;
            r.messages
                .push(format!("cluster {:#x} is referenced twice", *e));
        }
    }
    if changed {
        file.write_all_at(&table::vec_to_table(&t), l2_off)?;
    }
    Ok(())
}

/// Count unreferenced clusters; with repair, cut those at the end of the file off.
fn count_leaks(
    file: &HostFile,
    h: &Header,
    used: &Used,
    repair: Repair,
    r: &mut CheckReport,
) -> Result<()> {
    let cs = h.cluster_size as u64;
    let mut last_used = 0;
    for c in h.header_size as u64..used.n {
        if used.is_used(c) {
            last_used = c;
        } else {
            r.leaks += 1;
        }
    }
    let trailing = used.n - (last_used + 1);
    if repair != Repair::None && trailing > 0 {
        file.sync()?;
        file.set_len((last_used + 1) * cs)?;
        r.leaks_fixed += trailing;
        r.messages.push(format!(
            "{trailing} leaked clusters at the end of the file cut off"
        ));
    }
    if r.leaks > r.leaks_fixed {
        r.messages.push(format!(
            "{} leaked clusters (QED cannot reuse them)",
            r.leaks - r.leaks_fixed
        ));
    }
    Ok(())
}
