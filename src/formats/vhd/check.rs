//! `imgfs check [-r] -f vpc`: both footer copies, the dynamic header checksum, and every BAT
//! entry (inside the file, clear of the metadata, no block used twice). Repair rewrites a
//! missing or damaged footer copy from the good one, re-checksums a dynamic header whose fields
//! are sane, and unallocates BAT entries that point outside the file or at a block already used.
//! Leaks (blocks no BAT entry references, left by a power cut during an allocation) are
//! reported; repair cuts them off the end of the file, or punches them out between blocks.

use super::dynamic::{DynHeader, DynMap, HEADER_COOKIE, HEADER_LEN, UNALLOCATED};
use super::footer::{DiskType, FOOTER_LEN, SECTOR};
use super::read_footer;
use crate::error::Result;
use crate::format::{CheckReport, Repair};
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
    // Leaks are looked for only once every block the BAT keeps is known to be sound.
    if r.corruptions == r.corruptions_fixed {
        let kept: Vec<u64> = used
            .iter()
            .filter(|(_, idx)| !bad.contains(idx))
            .map(|&(host, _)| host)
            .collect();
        check_leaks(file, map, &kept, fix, r)?;
    }
    Ok(())
}

/// Space between the metadata and the footer that no BAT entry or parent locator covers. A
/// power cut between moving the footer and storing a new block's BAT entry leaves such a block
/// before the footer; each whole block's worth of it (bitmap + data) is a leak (between blocks,
/// only while it still holds host space). Gaps shorter than a block are padding (blocks placed
/// on 4 KiB data boundaries). Repair moves the footer back over leaks at the end of the file and truncates
/// it; leaks between blocks are punched out (they keep their place in the file, but no longer
/// hold host space, and are no longer reported).
fn check_leaks(
    file: &HostFile,
    map: &DynMap,
    blocks: &[u64],
    fix: bool,
    r: &mut CheckReport,
) -> Result<()> {
    let g = map.geo;
    let unit = g.bitmap_size + g.block_size;
    let len = file.len()?;
    let footer_at = len.saturating_sub(FOOTER_LEN as u64);
    let mut covered: Vec<(u64, u64)> = blocks.iter().map(|&h| (h, h + unit)).collect();
    for l in map.hdr.locators.iter().filter(|l| l.is_used()) {
        let space = (l.data_space as u64 * SECTOR).max(l.data_len as u64);
        covered.push((l.offset, l.offset.saturating_add(space)));
    }
    covered.sort_unstable();
    let meta_end = (g.bat_end().div_ceil(SECTOR) * SECTOR)
        .max(g.header_offset + HEADER_LEN as u64)
        .max(SECTOR);
    let mut gaps = vec![];
    let mut at = meta_end;
    for (start, end) in covered.into_iter().chain([(footer_at, footer_at)]) {
        if start.min(footer_at) > at {
            gaps.push((at, start.min(footer_at)));
        }
        at = at.max(end);
    }
    for (start, end) in gaps {
        let tail = end == footer_at;
        // Between blocks only space that still holds data counts (a repaired leak there is
        // a hole); before the footer the file itself is longer than it needs to be.
        if end - start < unit || !(tail || holds_data(file, start, end)?) {
            continue;
        }
        let n = (end - start) / unit;
        r.leaks += n;
        r.messages.push(format!(
            "{n} leaked block(s) at {start:#x}..{end:#x}: space no BAT entry references{}",
            if tail { " (before the footer)" } else { "" }
        ));
        if !fix {
            continue;
        }
        if tail {
            // The footer first, synced, then the file cut after it: a power cut in between
            // leaves a second, identical footer at the old end.
            let f = read_footer(file)?.footer;
            file.write_all_at(&f.to_bytes(), start)?;
            file.sync()?;
            file.set_len(start + FOOTER_LEN as u64)?;
            file.sync()?;
        } else {
            file.punch_hole(start, end - start)?;
            file.sync()?;
        }
        r.leaks_fixed += n;
    }
    Ok(())
}

/// Whether the whole 4 KiB pages inside `[start, end)` hold any data (not a hole; the
/// partial pages at its edges stay allocated after a punch).
fn holds_data(file: &HostFile, start: u64, end: u64) -> Result<bool> {
    let (start, end) = (start.next_multiple_of(4096), end / 4096 * 4096);
    Ok(start < end && file.seek_data(start)?.is_some_and(|d| d < end))
}
