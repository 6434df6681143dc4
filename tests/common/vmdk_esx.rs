//! Writers of ESX delta disks, which qemu-img cannot create: a `vmfsSparse` descriptor over a
//! COWD extent and a `seSparse` descriptor over an seSparse extent, laid out byte by byte from
//! the formats' documentation (VMware's COWDisk_Header; QEMU's block/vmdk.c for seSparse),
//! independently of imgfs's parsers. Each delta holds a known mix of allocated, zero and
//! unallocated grains (and, in the directory, missing tables) over a parent, and the writer
//! returns the guest bytes that mix means, so a test can hold QEMU's reading to it too.
//!
//! Included with `#[path = "common/vmdk_esx.rs"] mod vmdk_esx;` next to `mod common;`.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;

/// The content ID qemu-img reports for a VMDK.
pub fn cid(img: &Path) -> u32 {
    let out = super::common::qemu_img(&["info", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["cid"].as_u64().unwrap() as u32
}

/// A descriptor as ESXi writes one for a snapshot delta.
fn descriptor(create_type: &str, parent: &str, parent_cid: u32, line: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\n\
         parentCID={parent_cid:08x}\nisNativeSnapshot=\"no\"\ncreateType=\"{create_type}\"\n\
         parentFileNameHint=\"{parent}\"\n# Extent description\n{line}\n\n\
         # The Disk Data Base \n#DDB\n\nddb.longContentID = \"0123456789abcdef0123456789abcdef\"\n"
    )
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// The delta's own bytes for guest offset `off` (distinct from the parent's).
fn delta_bytes(data: &[u8], off: u64, len: u64) -> &[u8] {
    &data[off as usize..(off + len) as usize]
}

/// A vmfsSparse delta `NAME.vmdk` + `NAME-delta.vmdk` over `parent` (a file name beside it,
/// whose guest bytes are `parent_raw`), with grains of `grain` sectors. Returns the descriptor
/// and the guest bytes the delta means.
///
/// Pattern: grain table `t` exists unless `t % 3 == 1` (those 2 MiB x grain read the parent); a
/// table with `t % 5 == 4` exists but is empty; elsewhere runs of 7 grains hold data, then 14
/// fall through. Runs are stored in reverse order, so neighbours are not neighbours on disk.
pub fn write_vmfs_sparse(
    dir: &Path,
    name: &str,
    parent: &str,
    parent_raw: &[u8],
    grain: u32,
    seed: u64,
) -> (PathBuf, Vec<u8>) {
    const GTES: u64 = 4096;
    let size = parent_raw.len() as u64;
    let sectors = size / SECTOR;
    let grain_bytes = grain as u64 * SECTOR;
    let span = GTES * grain_bytes;
    let tables = size.div_ceil(span);
    let gd_entries = tables + 3; // VMware sizes directories generously: extra entries unused
    let gd_sectors = (gd_entries * 4).div_ceil(SECTOR);
    let has_table = |t: u64| t % 3 != 1;
    // Tables right after the directory, grains after the tables.
    let mut table_sector = vec![0u64; tables as usize];
    let mut next = 4 + gd_sectors;
    for (t, s) in table_sector.iter_mut().enumerate() {
        if has_table(t as u64) {
            *s = next;
            next += GTES * 4 / SECTOR;
        }
    }
    let data = super::common::random_bytes(seed, size as usize);
    let mut want = parent_raw.to_vec();
    let mut runs: Vec<(u64, u64)> = Vec::new(); // (first grain, count)
    for t in (0..tables).filter(|&t| has_table(t) && t % 5 != 4) {
        for j in (0..GTES).step_by(21) {
            let g = t * GTES + j;
            // Runs stay inside their table and the disk.
            let n = 7.min(GTES - j).min((size / grain_bytes).saturating_sub(g));
            if n > 0 {
                runs.push((g, n));
            }
        }
    }
    let mut meta = vec![0u8; (next * SECTOR) as usize];
    let mut grain_at = Vec::new();
    for &(g, n) in runs.iter().rev() {
        for k in 0..n {
            let gi = g + k;
            let (t, j) = (gi / GTES, gi % GTES);
            put32(
                &mut meta,
                table_sector[t as usize] * SECTOR + j * 4,
                next as u32,
            );
            let off = gi * grain_bytes;
            grain_at.push((next * SECTOR, off));
            want[off as usize..(off + grain_bytes) as usize].copy_from_slice(delta_bytes(
                &data,
                off,
                grain_bytes,
            ));
            next += grain as u64;
        }
    }
    for (t, &s) in table_sector.iter().enumerate() {
        put32(&mut meta, 4 * SECTOR + t as u64 * 4, s as u32);
    }
    meta[..4].copy_from_slice(b"COWD");
    for (i, v) in [
        1,
        3,
        sectors as u32,
        grain,
        4,
        gd_entries as u32,
        next as u32,
    ]
    .into_iter()
    .enumerate()
    {
        put32(&mut meta, 4 + i as u64 * 4, v);
    }
    put32(&mut meta, 1060, 7); // generation
    let extent = dir.join(format!("{name}-delta.vmdk"));
    let f = std::fs::File::create(&extent).unwrap();
    f.write_all_at(&meta, 0).unwrap();
    for (host, off) in grain_at {
        f.write_all_at(delta_bytes(&data, off, grain_bytes), host)
            .unwrap();
    }
    let desc = descriptor(
        "vmfsSparse",
        parent,
        cid(&dir.join(parent)),
        &format!("RW {sectors} VMFSSPARSE \"{name}-delta.vmdk\""),
    );
    let d = dir.join(format!("{name}.vmdk"));
    std::fs::write(&d, desc).unwrap();
    (d, want)
}

/// What a seSparse grain table entry says, by grain index within its table.
fn se_kind(j: u64) -> u8 {
    match (j / 5) % 6 {
        0 | 4 => b'd', // data
        2 => b'z',     // zero grain
        3 => b'u',     // unmapped (QEMU: zeros)
        _ => b'p',     // unallocated: the parent
    }
}

/// A seSparse delta `NAME.vmdk` + `NAME-sesparse.vmdk` over `parent` (guest bytes
/// `parent_raw`, a multiple of 16 MiB plus anything). Returns the descriptor and the guest bytes
/// the delta means.
///
/// Layout: const header, volatile header, journal header and journal (zeros), a directory of
/// two sectors (more than the capacity needs), grain tables, free bitmap and back map (zeros),
/// grains. Directory entry `t` names table number `tables - 1 - t` (tables stored in reverse)
/// unless `t % 3 == 1` (no table: the parent). Within a table grains cycle through data, parent,
/// zero, unmapped, data, parent in runs of 5. The grains of the first table are numbered from
/// 5000 up (past 4096, so both halves of the entry's grain number are used), the others from 0.
pub fn write_se_sparse(
    dir: &Path,
    name: &str,
    parent: &str,
    parent_raw: &[u8],
    seed: u64,
) -> (PathBuf, Vec<u8>) {
    const GRAIN: u64 = 4096;
    const GTES: u64 = 4096;
    const GT_SECTORS: u64 = 64;
    let size = parent_raw.len() as u64;
    let sectors = size / SECTOR;
    let span = GRAIN * GTES;
    let dir_entries = size.div_ceil(span);
    let with_table: Vec<u64> = (0..dir_entries).filter(|t| t % 3 != 1).collect();
    let tables = with_table.len() as u64;
    let (vol, jh, journal, gd, gd_sectors, gts) = (1u64, 2u64, 4u64, 16u64, 2u64, 32u64);
    let free_bitmap = gts + tables * GT_SECTORS;
    let backmap = free_bitmap + 8;
    let grains = backmap + 8;
    let mut meta = vec![0u8; (grains * SECTOR) as usize];
    let data = super::common::random_bytes(seed, size as usize);
    let mut want = parent_raw.to_vec();
    let mut writes = Vec::new();
    let mut max_number = 0;
    for (k, &t) in with_table.iter().enumerate() {
        let table_no = tables - 1 - k as u64;
        put64(
            &mut meta,
            gd * SECTOR + t * 8,
            0x1000_0000_0000_0000 | table_no,
        );
        let table_at = (gts + table_no * GT_SECTORS) * SECTOR;
        let mut number = if k == 0 { 5000 } else { 0 };
        for j in 0..GTES {
            let off = t * span + j * GRAIN;
            if off >= size {
                break;
            }
            let entry = match se_kind(j) {
                b'd' => {
                    let e = 0x3000_0000_0000_0000 | ((number & 0xfff) << 48) | (number >> 12);
                    writes.push(((grains + number * 8) * SECTOR, off));
                    want[off as usize..(off + GRAIN) as usize]
                        .copy_from_slice(delta_bytes(&data, off, GRAIN));
                    max_number = max_number.max(number);
                    number += 1;
                    e
                }
                b'z' | b'u' => {
                    want[off as usize..(off + GRAIN) as usize].fill(0);
                    // Low bits are ignored for both; set some to show it.
                    let ty = if se_kind(j) == b'z' { 0x2 } else { 0x1 };
                    (ty << 60) | j
                }
                _ => 0,
            };
            put64(&mut meta, table_at + j * 8, entry);
        }
    }
    // Const header: (offset, size) pairs in sectors from word 10 on.
    for (i, v) in [
        0xcafe_babe,
        0x2_0000_0001,
        sectors,
        8,
        GT_SECTORS,
        0,
        0,
        0,
        0,
        0,
        vol,
        1,
        jh,
        2,
        journal,
        12,
        gd,
        gd_sectors,
        gts,
        tables * GT_SECTORS,
        free_bitmap,
        8,
        backmap,
        8,
        grains,
        (max_number + 1) * 8,
    ]
    .into_iter()
    .enumerate()
    {
        put64(&mut meta, i as u64 * 8, v);
    }
    // Volatile header: magic, free GT number, next transaction, replay journal = 0.
    for (i, v) in [0xcafe_cafe, tables, 1, 0].into_iter().enumerate() {
        put64(&mut meta, vol * SECTOR + i as u64 * 8, v);
    }
    let extent = dir.join(format!("{name}-sesparse.vmdk"));
    let f = std::fs::File::create(&extent).unwrap();
    f.write_all_at(&meta, 0).unwrap();
    for (host, off) in writes {
        f.write_all_at(delta_bytes(&data, off, GRAIN), host)
            .unwrap();
    }
    f.set_len((grains + (max_number + 1) * 8) * SECTOR).unwrap();
    let desc = descriptor(
        "seSparse",
        parent,
        cid(&dir.join(parent)),
        &format!("RW {sectors} SESPARSE \"{name}-sesparse.vmdk\""),
    );
    let d = dir.join(format!("{name}.vmdk"));
    std::fs::write(&d, desc).unwrap();
    (d, want)
}
