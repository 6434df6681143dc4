//! ESX snapshot deltas against QEMU: `vmfsSparse` (COWD extents) and `seSparse` descriptors over
//! a parent qemu-img made. qemu-img cannot create these, so tests/common/vmdk_esx.rs writes them
//! byte by byte with a known mix of allocated, zero and unallocated grains and missing tables.
//! QEMU's reading must equal that mix, and imgfs's (engine and mounted file) must equal QEMU's,
//! including where the delta falls through to its parent. vmfsSparse writes (QEMU writes them)
//! must match QEMU doing the same writes; seSparse is served read-only (QEMU does not write it).

mod common;
#[path = "common/vmdk_esx.rs"]
mod vmdk_esx;
use common::*;
use vmdk_esx::{write_se_sparse, write_vmfs_sparse};

use imgfs::error::ErrorKind;
use imgfs::{Image, OpenOpts};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// Three seSparse tables (16 MiB each) and 24 COWD tables of 512-byte grains.
const SIZE: u64 = 48 * MIB;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn open(img: &Path, read_only: bool) -> Image {
    Image::open(img, &open_opts(read_only)).unwrap()
}

/// `base.vmdk` (monolithicSparse, SIZE) full of random data but for an unallocated hole, and
/// its guest bytes.
fn make_base(dir: &Path) -> Vec<u8> {
    let base = dir.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&base), &SIZE.to_string()]);
    let data = write_file(dir, "base.data", &random_bytes(1, SIZE as usize));
    let d = p(&data);
    qemu_io(
        "vmdk",
        &base,
        &[
            &format!("write -s {d} 0 {}", 20 * MIB),
            &format!("write -s {d} {} {}", 24 * MIB, SIZE - 24 * MIB),
        ],
    );
    std::fs::remove_file(&data).unwrap();
    qemu_raw(&base)
}

/// QEMU reads the delta as the writer meant it, and imgfs reads what QEMU reads.
fn assert_reads(img: &Path, want: &[u8]) {
    let qemu = qemu_raw(img);
    assert_same(&qemu, want, &format!("QEMU's reading of {}", img.display()));
    let image = open(img, true);
    assert_eq!(image.backing().unwrap().format(), "vmdk");
    assert_same(
        &engine_read_all(&image),
        &qemu,
        &format!("{}", img.display()),
    );
    // Unaligned, across grains and tables.
    for (off, len) in [
        (16 * MIB - 7777, 20_001),
        (999, 70_001),
        (SIZE - 5000, 5000),
    ] {
        let mut buf = vec![0u8; len];
        image.read_at(&mut buf, off).unwrap();
        assert_same(&buf, &qemu[off as usize..off as usize + len], "unaligned");
    }
}

fn info_json(img: &Path) -> serde_json::Value {
    let out = ok(IMGFS, &["info", "--json", p(img)]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn vmfs_sparse_and_se_sparse_deltas_read_as_qemu_reads_them() {
    let dir = tmpdir();
    let d = dir.path();
    let base = make_base(d);
    for grain in [1, 128] {
        let (img, want) = write_vmfs_sparse(d, &format!("v{grain}"), "base.vmdk", &base, grain, 2);
        assert_reads(&img, &want);
        let v = info_json(&img);
        let f = &v["format_specific"];
        assert_eq!(f["create_type"], "vmfsSparse");
        assert_eq!(f["extents"][0]["type"], "VMFSSPARSE");
        assert_eq!(f["extents"][0]["format"], "COWD");
        assert_eq!(v["cluster_size"], grain as u64 * 512);
        assert_eq!(v["backing_file"], "base.vmdk");
        assert_check_clean("vmdk", &img);
        ok(IMGFS, &["check", p(&img)]);
    }
    let (img, want) = write_se_sparse(d, "se", "base.vmdk", &base, 3);
    assert_reads(&img, &want);
    let v = info_json(&img);
    assert_eq!(v["format_specific"]["create_type"], "seSparse");
    assert_eq!(v["format_specific"]["extents"][0]["format"], "seSparse");
    assert_eq!(v["cluster_size"], 4096);
    assert_check_clean("vmdk", &img);
    ok(IMGFS, &["check", p(&img)]);
    // Served read-only, whatever the open asked for.
    let image = open(&img, false);
    assert!(image.is_read_only());
    let err = image.write_at(&[1], 0).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
}

#[test]
fn esx_deltas_mount_byte_exact() {
    let dir = tmpdir();
    let d = dir.path();
    let base = make_base(d);
    let (v, vwant) = write_vmfs_sparse(d, "v", "base.vmdk", &base, 1, 4);
    let (s, swant) = write_se_sparse(d, "s", "base.vmdk", &base, 5);
    let m = Mount::new(&[&v, &s], &d.join("mnt"), &[]);
    assert_same(&std::fs::read(m.file("v.raw")).unwrap(), &vwant, "v.raw");
    assert_same(&std::fs::read(m.file("s.raw")).unwrap(), &swant, "s.raw");
    let err = pwrite(&m.file("s.raw"), 0, b"x").unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    // The vmfsSparse delta takes writes through the mount.
    let b = random_bytes(6, 100_000);
    pwrite(&m.file("v.raw"), 3 * MIB - 5000, &b).unwrap();
    let (ok_, msg) = m.umount();
    assert!(ok_, "{msg}");
    let mut want = vwant;
    want[(3 * MIB - 5000) as usize..(3 * MIB - 5000) as usize + b.len()].copy_from_slice(&b);
    assert_same(&qemu_raw(&v), &want, "after the mounted write");
    assert_check_clean("vmdk", &v);
}

/// Writes (offset, length, seed): aligned and not, within a grain, across grains and grain
/// tables, over the delta's data and over the parent's, all into ranges whose grain table exists.
fn writes() -> Vec<(u64, usize, u64)> {
    vec![
        (0, 4096, 1),
        (100, 1000, 2),
        (6 * MIB - 100_123, 300_000, 3), // across two tables of 512-byte grains
        (6 * MIB - 3, 6, 4),
        (24 * MIB - 1000, 70_000, 5), // over the parent's hole
        (SIZE - 512, 512, 6),
        (100, 1000, 7), // again: now allocated
    ]
}

/// Writes into ranges whose directory entry is empty (with 512-byte grains: tables 1, 4, 10 of
/// 2 MiB each), and across into a present table.
fn writes_into_missing_tables() -> Vec<(u64, usize, u64)> {
    vec![
        (2 * MIB - 3000, 7000, 11),
        (2 * MIB + 65536, 65536, 12),
        (8 * MIB, 4096, 13),
        (21 * MIB - 7, 65536 * 3 + 17, 14),
    ]
}

fn free_sector(extent: &Path) -> u64 {
    let b = pread(extent, 28, 4);
    u32::from_le_bytes(b.try_into().unwrap()) as u64
}

/// imgfs applies `w` to `img`, and to `want`.
fn imgfs_writes(img: &Path, want: &mut [u8], w: &[(u64, usize, u64)]) {
    let image = open(img, false);
    assert!(!image.is_read_only());
    for &(off, len, seed) in w {
        let b = random_bytes(seed, len);
        image.write_at(&b, off).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&b);
    }
    image.close().unwrap();
}

#[test]
fn vmfs_sparse_writes_match_qemu_doing_the_same() {
    let dir = tmpdir();
    let d = dir.path();
    let base = make_base(d);
    let base_before = std::fs::read(d.join("base.vmdk")).unwrap();
    for grain in [1, 128] {
        // The same delta twice: imgfs writes one, QEMU the other.
        let (ours, mut want) =
            write_vmfs_sparse(d, &format!("a{grain}"), "base.vmdk", &base, grain, 9);
        let (theirs, _) = write_vmfs_sparse(d, &format!("b{grain}"), "base.vmdk", &base, grain, 9);
        let cid0 = vmdk_esx::cid(&ours);
        imgfs_writes(&ours, &mut want, &writes());
        let cmds: Vec<String> = writes()
            .into_iter()
            .map(|(off, len, seed)| {
                let f = write_file(d, &format!("w{seed}"), &random_bytes(seed, len));
                format!("write -s {} {off} {len}", p(&f))
            })
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io("vmdk", &theirs, &cmds);
        let what = format!("grain {grain}");
        assert_same(&qemu_raw(&ours), &want, &what);
        ok("qemu-img", &["compare", p(&ours), p(&theirs)]);
        assert_ne!(vmdk_esx::cid(&ours), cid0, "{what}: CID must change");
        // Where QEMU 10.0.2 would overwrite the COWD header (docs/vmdk.md), imgfs adds tables.
        imgfs_writes(&ours, &mut want, &writes_into_missing_tables());
        assert_same(&qemu_raw(&ours), &want, &what);
        assert_check_clean("vmdk", &ours);
        ok(IMGFS, &["check", p(&ours)]);
        assert_same(&open_read_all(&ours, true), &want, &what);
        // VMware's allocator never hands out a sector imgfs used.
        let extent = d.join(format!("a{grain}-delta.vmdk"));
        let len = std::fs::metadata(&extent).unwrap().len();
        assert!(free_sector(&extent) * 512 >= len, "{what}: freeSector");
    }
    assert_eq!(
        std::fs::read(d.join("base.vmdk")).unwrap(),
        base_before,
        "the parent changed"
    );
}

/// Header fields of both extents set to hostile values: each refused with an error naming the
/// extent file, never a panic or a huge allocation.
#[test]
fn hostile_esx_extents_are_refused_or_fail_their_range() {
    let dir = tmpdir();
    let d = dir.path();
    let base = make_base(d);
    let (v, _) = write_vmfs_sparse(d, "v", "base.vmdk", &base, 1, 10);
    let (s, _) = write_se_sparse(d, "s", "base.vmdk", &base, 11);
    let cowd = d.join("v-delta.vmdk");
    let sese = d.join("s-sesparse.vmdk");
    let cowd0 = std::fs::read(&cowd).unwrap();
    let sese0 = std::fs::read(&sese).unwrap();
    let refused = |img: &Path, extent: &Path, bytes: &[u8], what: &str| {
        std::fs::write(extent, bytes).unwrap();
        let e = Image::open(img, &open_opts(true)).err();
        let e = e.unwrap_or_else(|| panic!("{what}: opened"));
        let msg = e.to_string();
        assert!(msg.contains(what), "{what}: {msg}");
        assert!(msg.contains(p(extent)), "{what}: names no file: {msg}");
    };
    let put = |b: &[u8], at: usize, v: &[u8]| {
        let mut b = b.to_vec();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    for (at, val, what) in [
        (16usize, 0u32, "grain size"),
        (16, 3, "grain size"),
        (16, 1 << 31, "grain size"),
        (20, 1, "overlaps"),
        (24, 1, "cannot map"),
        (20, u32::MAX, "outside the file"),
    ] {
        refused(&v, &cowd, &put(&cowd0, at, &val.to_le_bytes()), what);
    }
    refused(&v, &cowd, &cowd0[..1000], "shorter");
    for (word, val, what) in [
        (1usize, 1u64, "version"),
        (3, 1, "grain size"),
        (4, 1, "grain table size"),
        (5, 1, "flags"),
        (9, 1, "reserved"),
        (2, u64::MAX, "64 TiB"),
        (10, u64::MAX, "volatile header"),
        (16, 1 << 40, "grain directory"),
        (17, 0, "cannot map"),
        (24, u64::MAX, "grains offset"),
    ] {
        refused(&s, &sese, &put(&sese0, word * 8, &val.to_le_bytes()), what);
    }
    refused(&s, &sese, &put(&sese0, 512 + 24, &[1]), "dirty");
    refused(&s, &sese, &put(&sese0, 512, &[0]), "volatile header");
    // The delta claims fewer sectors than the descriptor gives it.
    refused(
        &v,
        &cowd,
        &put(&cowd0, 12, &8u32.to_le_bytes()),
        "holds 8 sectors",
    );
    // Bad directory and table entries fail their own range with EIO; the rest reads.
    std::fs::write(
        &sese,
        put(&sese0, 16 * 512, &0x2000_0000_0000_0001u64.to_le_bytes()),
    )
    .unwrap();
    let image = open(&s, true);
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        image.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    image.read_at(&mut buf, 16 * MIB).unwrap();
    drop(image);
    let gt = 32 * 512 + 64 * 512; // the first directory entry's table (table 1 of 0..=1)
    for entry in [0x4000_0000_0000_0000u64, 7, 0x3000_ffff_ffff_ffff] {
        std::fs::write(&sese, put(&sese0, gt, &entry.to_le_bytes())).unwrap();
        let image = open(&s, true);
        let e = image.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{entry:#x}");
        image.read_at(&mut buf, 32 * MIB).unwrap();
        assert!(
            !run(IMGFS, &["check", p(&s)]).status.success(),
            "{entry:#x}"
        );
    }
    std::fs::write(&cowd, put(&cowd0, 4 * 512, &u32::MAX.to_le_bytes())).unwrap();
    let image = open(&v, true);
    assert_eq!(
        image.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    image.read_at(&mut buf, 4 * MIB).unwrap();
    drop(image);
    // A bare delta extent is refused with a pointer to its descriptor (QEMU fails on it too).
    std::fs::write(&cowd, &cowd0).unwrap();
    for extent in [&cowd, &sese] {
        let out = run(IMGFS, &["info", p(extent)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("open the descriptor"),
            "{err}"
        );
    }
}

/// Seeded mutations of both extents' metadata: open, read and (COWD) write never panic.
/// `IMGFS_MUTANTS=N` sets the rounds (200 in the suite).
#[test]
fn mutated_esx_extents_never_panic() {
    let dir = tmpdir();
    let d = dir.path();
    let base = make_base(d);
    let (v, _) = write_vmfs_sparse(d, "v", "base.vmdk", &base, 1, 12);
    let (s, _) = write_se_sparse(d, "s", "base.vmdk", &base, 13);
    let cases: Vec<(PathBuf, PathBuf, Vec<u8>)> = [(v, "v-delta.vmdk"), (s, "s-sesparse.vmdk")]
        .into_iter()
        .map(|(img, e)| {
            let e = d.join(e);
            let bytes = std::fs::read(&e).unwrap();
            (img, e, bytes)
        })
        .collect();
    let mut rng = imgfs::host::SplitMix64::new(77);
    let mut opened = 0;
    let rounds: usize = std::env::var("IMGFS_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for round in 0..rounds {
        let (img, extent, orig) = &cases[round % 2];
        // Metadata: headers, directory, the first tables (only they are rewritten each round;
        // a write through a mutant may have changed the rest, which is fine).
        let hot = 200 * 1024;
        let mut b = orig[..hot as usize].to_vec();
        for _ in 0..1 + rng.below(6) {
            // Half of them in the headers and directory (the first 8 KiB of both).
            let span = if rng.below(2) == 0 { 8192 } else { hot };
            let at = (rng.below(span) & !3) as usize;
            let v = match rng.below(3) {
                0 => rng.next_u64(),
                1 => u64::MAX >> rng.below(64),
                _ => rng.below(1 << 20),
            };
            let n = if rng.below(2) == 0 { 4 } else { 8 };
            b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(extent)
            .unwrap()
            .write_all_at(&b, 0)
            .unwrap();
        let read_only = rng.below(2) == 0;
        let opts = OpenOpts {
            cache_size: 64 << 10,
            ..open_opts(read_only)
        };
        let Ok(image) = Image::open(img, &opts) else {
            continue;
        };
        opened += 1;
        let mut buf = vec![0u8; 256 << 10];
        for off in [0, 2 * MIB - 100, 16 * MIB, SIZE - buf.len() as u64] {
            let _ = image.read_at(&mut buf, off);
        }
        if !read_only {
            for _ in 0..3 {
                let off = rng.below(SIZE - 70_000);
                let _ = image.write_at(&buf[..65_536 + rng.below(4096) as usize], off);
            }
            let _ = image.flush();
        }
        let _ = image.close();
    }
    eprintln!("{rounds} mutated ESX extents survived ({opened} opened and exercised)");
    assert!(
        opened > rounds / 10,
        "only {opened} of {rounds} mutants opened"
    );
}
