//! `imgfs check` for VMDK: per sparse extent (KDMV or COWD), directory entries and grain tables
//! that point outside the file, GD/RGD and GT/RGT disagreement, grains inside the metadata or
//! used twice, and leaked space (bytes past the metadata no table points at); per seSparse
//! extent, entries of unknown type, tables and grains outside the file, grains used twice.
//!
//! Repairs: `-r leaks` punches leaked space (and trims it at the end of the file) and brings
//! redundant tables a crash left out of date up to their primaries; `-r all` also drops entries
//! pointing outside the file or used twice.

use super::descriptor::{Descriptor, Kind};
use super::read_sparse_header;
use super::sesparse::SeSparse;
use super::sparse::{read_dir, Header, GTE_ZEROED, SECTOR};
use crate::error::{Error, Result};
use crate::format::{CheckReport, Repair};
use crate::formats::le32;
use crate::host::HostFile;
use std::collections::HashSet;

pub fn check(file: HostFile, repair: Repair) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let mut head = [0u8; 4];
    let n = file.read_at(&mut head, 0)?;
    if head[..n].starts_with(super::sparse::MAGIC) {
        let h = read_sparse_header(&file)?;
        check_sparse(&file, &h, repair, &mut r)?;
        return Ok(r);
    }
    let len = file.len()?;
    if len > super::descriptor::MAX_DESCRIPTOR {
        return Err(Error::corrupt("VMDK descriptor larger than 1 MiB"));
    }
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, 0)?;
    let d = Descriptor::parse(&b)?;
    let dir = file
        .path()
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    for e in d
        .extents
        .iter()
        .filter(|e| matches!(e.kind, Kind::Sparse | Kind::SeSparse))
    {
        // Only plain names beside the descriptor: check opens no file the policy would refuse.
        if e.file.contains('/') || e.file.starts_with('.') {
            return Err(Error::unsupported(format!(
                "check only opens extents beside the descriptor, not {:?}",
                e.file
            )));
        }
        let f = HostFile::open(&dir.join(&e.file), repair != Repair::None)?;
        let checked = if e.kind == Kind::SeSparse {
            check_sesparse(&f, &mut r)
        } else {
            super::read_grain_header(&f).and_then(|(h, _, _)| check_sparse(&f, &h, repair, &mut r))
        };
        checked.map_err(|x| x.in_file(f.path()))?;
    }
    Ok(r)
}

/// seSparse extents are read-only: problems are reported, never repaired.
fn check_sesparse(file: &HostFile, r: &mut CheckReport) -> Result<()> {
    let se = SeSparse::open(0, file.clone(), crate::format::DEFAULT_CACHE_SIZE)?;
    let (problems, allocated) = se.check()?;
    r.total_clusters += (se.hdr.capacity * SECTOR).div_ceil(se.grain_bytes());
    r.allocated_clusters += allocated;
    r.corruptions += problems.len() as u64;
    r.messages.extend(problems);
    Ok(())
}

fn read_table(file: &HostFile, sector: u64, n: usize) -> Result<Vec<u32>> {
    let mut b = vec![0u8; n * 4];
    file.read_exact_at(&mut b, sector * SECTOR)?;
    Ok(b.chunks_exact(4).map(|c| le32(c, 0)).collect())
}

fn table_bytes(t: &[u32]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn check_sparse(file: &HostFile, h: &Header, repair: Repair, r: &mut CheckReport) -> Result<()> {
    let all = repair == Repair::All;
    let file_len = file.len()?;
    let n = h.gd_entries();
    let mut gd = read_dir(file, h.gd_offset, n, file_len)?;
    let mut rgd = if h.has_rgd() {
        read_dir(file, h.rgd_offset, n, file_len)?
    } else {
        Vec::new()
    };
    let gtes = h.gtes_per_gt as usize;
    let grain = h.grain_bytes();
    let meta_end = h.overhead * SECTOR;
    let fits = |s: u64, len: u64| s * SECTOR + len <= file_len;
    // Used byte ranges past the metadata (tables allocated later, grains).
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut seen = HashSet::new();
    let mut dirs_changed = false;
    r.total_clusters += (h.capacity * SECTOR).div_ceil(grain);
    for i in 0..n as usize {
        let (s, rs) = (gd[i] as u64, rgd.get(i).copied().unwrap_or(0) as u64);
        if s == 0 {
            continue;
        }
        if !fits(s, h.gt_bytes()) {
            r.corruptions += 1;
            r.messages.push(format!(
                "grain directory entry {i}: table at sector {s} outside the file"
            ));
            if all {
                gd[i] = 0;
                dirs_changed = true;
                r.corruptions_fixed += 1;
            }
            continue;
        }
        used.push((s * SECTOR, h.gt_bytes()));
        let mut gt = read_table(file, s, gtes)?;
        let mut gt_changed = false;
        for (j, e) in gt.iter_mut().enumerate() {
            let g = *e as u64;
            if g == 0 || (g == GTE_ZEROED as u64 && h.zero_grain()) {
                continue;
            }
            let need = if h.compressed() { 1 } else { grain };
            let problem = if !fits(g, need) {
                Some("outside the file")
            } else if g * SECTOR < meta_end {
                Some("inside the metadata")
            } else if !seen.insert(g) {
                Some("also used by another entry")
            } else {
                None
            };
            match problem {
                Some(p) => {
                    r.corruptions += 1;
                    r.messages.push(format!(
                        "grain table {i} entry {j}: grain at sector {g} {p}"
                    ));
                    if all {
                        *e = 0;
                        gt_changed = true;
                        r.corruptions_fixed += 1;
                    }
                }
                None => {
                    r.allocated_clusters += 1;
                    used.push((g * SECTOR, if h.compressed() { SECTOR } else { grain }));
                }
            }
        }
        if gt_changed {
            file.write_all_at(&table_bytes(&gt), s * SECTOR)?;
        }
        if h.has_rgd() {
            // The redundant copies are written after the primaries; a crash between leaves
            // them out of date, which costs nothing (reads use the primary): counted with the
            // leaks and brought up to date by any repair.
            let stale = |r: &mut CheckReport, what: String| {
                r.leaks += 1;
                r.messages.push(what);
                if repair != Repair::None {
                    r.leaks_fixed += 1;
                }
            };
            if rs == 0 || !fits(rs, h.gt_bytes()) {
                stale(
                    r,
                    format!("redundant grain directory entry {i} is out of date"),
                );
                if repair != Repair::None {
                    let at = (file.len()?.div_ceil(SECTOR)) * SECTOR;
                    file.write_all_at(&table_bytes(&gt), at)?;
                    rgd[i] = (at / SECTOR) as u32;
                    dirs_changed = true;
                    used.push((at, h.gt_bytes()));
                }
                continue;
            }
            used.push((rs * SECTOR, h.gt_bytes()));
            if read_table(file, rs, gtes)? != gt {
                stale(r, format!("redundant grain table {i} is out of date"));
                if repair != Repair::None {
                    file.write_all_at(&table_bytes(&gt), rs * SECTOR)?;
                }
            }
        }
    }
    if dirs_changed {
        file.write_all_at(&table_bytes(&gd), h.gd_offset * SECTOR)?;
        if h.has_rgd() {
            file.write_all_at(&table_bytes(&rgd), h.rgd_offset * SECTOR)?;
        }
    }
    if !h.compressed() {
        leaks(file, meta_end, &mut used, repair, r)?;
    }
    if repair != Repair::None {
        file.sync()?;
    }
    Ok(())
}

/// Space past the metadata that nothing points at.
fn leaks(
    file: &HostFile,
    meta_end: u64,
    used: &mut [(u64, u64)],
    repair: Repair,
    r: &mut CheckReport,
) -> Result<()> {
    used.sort_unstable();
    let file_len = file.len()?;
    let mut pos = meta_end;
    let mut gaps = Vec::new();
    for &(at, len) in used.iter() {
        if at > pos {
            gaps.push((pos, at - pos));
        }
        pos = pos.max(at + len);
    }
    let last_used = pos;
    if file_len > pos {
        gaps.push((pos, file_len - pos));
    }
    for &(at, len) in &gaps {
        // Only data-bearing gaps count (a hole reads as zeros and costs no space).
        if file.seek_data(at)?.is_none_or(|d| d >= at + len) {
            continue;
        }
        r.leaks += 1;
        r.messages
            .push(format!("{len} bytes at {at:#x} are allocated but unused"));
        if repair != Repair::None {
            if at + len >= file_len {
                file.set_len(last_used.max(meta_end))?;
            } else {
                file.punch_hole(at, len)?;
            }
            r.leaks_fixed += 1;
        }
    }
    Ok(())
}
