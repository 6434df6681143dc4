//! `imgfs check [-r] -f vpc`: both footer copies, the dynamic header checksum, and every BAT
//! entry (inside the file, clear of the metadata, no block used twice). Repair rewrites a
//! missing or damaged footer copy from the good one, re-checksums a dynamic header whose fields
//! are sane, and unallocates BAT entries that point outside the file or at a block already used.

use super::dynamic::{DynHeader, DynMap, HEADER_COOKIE, HEADER_LEN, UNALLOCATED};
use super::footer::{DiskType, FOOTER_LEN, SECTOR};
use super::read_footer;
use crate::error::Result;
use crate::format::{BlockMap, CheckReport, Repair};
use crate::formats::be32;
use crate::host::HostFile;

pub fn check(file: HostFile, repair: Repair) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let fix = repair == Repair::All;
    let found = read_footer(&file)?;
    let f = found.footer.clone();
    let len = file.len()?;
    for p in &found.problems {
        r.corruptions += 1;
        r.messages.push(p.clone());
    }
    if fix && !found.problems.is_empty() {
        if found.head.as_ref() != Some(&f) {
            file.write_all_at(&f.to_bytes(), 0)?;
        }
        if found.tail.as_ref() != Some(&f) {
            // The tail copy goes after the last block (QEMU writes it there too).
            let map = DynMap::open(file.clone(), f.clone(), true, 1 << 20)?;
            let end = super::dynamic::scan_end(&file, &map.geo)?;
            let at = end.max(len.saturating_sub(FOOTER_LEN as u64) / SECTOR * SECTOR);
            file.write_all_at(&f.to_bytes(), at)?;
        }
        file.sync()?;
        r.corruptions_fixed += found.problems.len() as u64;
    }
    if f.disk_type == DiskType::Fixed {
        r.total_clusters = f.virtual_size() / SECTOR;
        return Ok(r);
    }
    check_header(&file, f.data_offset, fix, &mut r)?;
    let map = DynMap::open(file.clone(), f, !fix, 4 << 20)?;
    check_bat(&file, &map, fix, &mut r)?;
    Ok(r)
}

/// A dynamic header whose checksum alone is wrong (its fields pass the open-time checks after
/// re-checksumming) is repaired; other damage is left to the open, which refuses it.
fn check_header(file: &HostFile, off: u64, fix: bool, r: &mut CheckReport) -> Result<()> {
    let mut b = vec![0u8; HEADER_LEN];
    file.read_exact_at(&mut b, off)?;
    if &b[..8] != HEADER_COOKIE {
        return Ok(());
    }
    let stored = be32(&b, 36);
    let computed = super::footer::checksum(&b, 36);
    if stored == computed {
        return Ok(());
    }
    r.corruptions += 1;
    r.messages.push(format!(
        "dynamic header checksum {stored:#010x}, contents say {computed:#010x}"
    ));
    if fix {
        b[36..40].copy_from_slice(&computed.to_be_bytes());
        DynHeader::parse(&b)?;
        file.write_all_at(&b, off)?;
        file.sync()?;
        r.corruptions_fixed += 1;
    }
    Ok(())
}

fn check_bat(file: &HostFile, map: &DynMap, fix: bool, r: &mut CheckReport) -> Result<()> {
    let g = map.geo;
    let file_len = file.len()?;
    let entries = map.entries()?;
    r.total_clusters = g.entries;
    let mut used: Vec<(u64, u64)> = vec![];
    let mut bad = vec![];
    for (idx, &e) in entries.iter().enumerate() {
        if e == UNALLOCATED {
            continue;
        }
        let host = e as u64 * SECTOR;
        let end = host + g.bitmap_size + g.block_size;
        if end > file_len || g.overlaps_metadata(host) {
            r.corruptions += 1;
            r.messages.push(format!(
                "BAT entry {idx}: block at {host:#x} lies outside the data area of the file \
                 ({file_len:#x} bytes)"
            ));
            bad.push(idx as u64);
            continue;
        }
        used.push((host, idx as u64));
    }
    used.sort_unstable();
    let mut prev_end = 0;
    for &(host, idx) in &used {
        if host < prev_end {
            r.corruptions += 1;
            r.messages
                .push(format!("BAT entry {idx}: block at {host:#x} is used twice"));
            bad.push(idx);
            continue;
        }
        prev_end = host + g.bitmap_size + g.block_size;
    }
    r.allocated_clusters = used.len() as u64 - (bad.len() as u64).min(used.len() as u64);
    if fix && !bad.is_empty() {
        for idx in &bad {
            file.write_all_at(&UNALLOCATED.to_be_bytes(), g.bat_offset + idx * 4)?;
        }
        file.sync()?;
        r.corruptions_fixed += bad.len() as u64;
    }
    let _ = map.info();
    Ok(())
}
