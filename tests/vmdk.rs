//! VMDK end to end against QEMU: every subformat qemu-img makes reads byte-identical to
//! `qemu-img convert -O raw`; writes (aligned, unaligned, across grains and extents, over a
//! parent) pass `qemu-img check` and `qemu-img compare`; parents never change; CID linkage;
//! imgfs create / check / info; hostile descriptors and headers; OVA appliances.

mod common;
use common::*;

use imgfs::{Image, OpenOpts};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;
/// Just over one 2 GiB extent: split subformats get two extent files.
const SPLIT_SIZE: u64 = 2048 * MIB + 8 * MIB;

fn rw() -> OpenOpts {
    open_opts(false)
}
fn ro() -> OpenOpts {
    open_opts(true)
}
fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Guest ranges worth comparing on a disk of `size` (whole disks of 2 GiB are not read).
fn ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= 64 * MIB {
        return vec![(0, size)];
    }
    vec![
        (0, 8 * MIB),
        (2048 * MIB - 4 * MIB, 8 * MIB),
        (size - 4 * MIB, 4 * MIB),
    ]
}

/// A VMDK of `sub` made by qemu-img and filled by qemu-io: random data across grain and
/// extent boundaries, a zero write, a pattern.
fn make(dir: &Path, name: &str, opts: &str, size: u64, seed: u64) -> PathBuf {
    let img = dir.join(name);
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        opts,
        p(&img),
        &size.to_string(),
    ]);
    let data = write_file(dir, &format!("{name}.data"), &random_bytes(seed, 300_000));
    let d = p(&data);
    let e = 2048 * MIB;
    let mut cmds = vec![
        format!("write -s {d} 0 300000"),
        format!("write -s {d} 1000000 123456"),
        "write -P 0x5a 3M 4096".to_string(),
        format!("write -s {d} {} 65536", size - 65536),
    ];
    if size > e {
        cmds.push(format!("write -s {d} {} 200000", e - 100_000));
    }
    let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io("vmdk", &img, &cmds);
    assert_check_clean("vmdk", &img);
    img
}

/// A 16 MiB monolithicSparse VMDK filled by `make`.
fn make_sparse(dir: &Path, name: &str, seed: u64) -> PathBuf {
    make(dir, name, "subformat=monolithicSparse", 16 * MIB, seed)
}

/// `qemu-img convert -O raw` into a (sparse) file beside the image.
fn expect_file(img: &Path) -> PathBuf {
    let out = img.with_extension("expect");
    qemu_img(&["convert", "-O", "raw", p(img), p(&out)]);
    out
}

fn assert_reads(image: &Image, expect: &Path, what: &str) {
    assert_eq!(
        image.size(),
        std::fs::metadata(expect).unwrap().len(),
        "{what}: size"
    );
    for (off, len) in ranges(image.size()) {
        let mut got = vec![0u8; len as usize];
        image.read_at(&mut got, off).unwrap();
        assert_same(
            &got,
            &pread(expect, off, len as usize),
            &format!("{what} @{off:#x}"),
        );
    }
}

const SUBFORMATS: &[(&str, u64)] = &[
    ("subformat=monolithicSparse", 16 * MIB),
    ("subformat=monolithicFlat", 16 * MIB),
    ("subformat=twoGbMaxExtentSparse", SPLIT_SIZE),
    ("subformat=twoGbMaxExtentFlat", SPLIT_SIZE),
    (
        "subformat=monolithicSparse,zeroed_grain=on,compat6=on",
        16 * MIB,
    ),
];

#[test]
fn reads_match_qemu_every_subformat() {
    let dir = tmpdir();
    for (i, (opts, size)) in SUBFORMATS.iter().enumerate() {
        let img = make(dir.path(), &format!("r{i}.vmdk"), opts, *size, i as u64);
        let expect = expect_file(&img);
        let image = Image::open(&img, &ro()).unwrap();
        assert_eq!(image.format(), "vmdk");
        assert_reads(&image, &expect, opts);
        // Unaligned read across grains.
        let mut buf = vec![0u8; 70_001];
        image.read_at(&mut buf, 999_999).unwrap();
        assert_same(&buf, &pread(&expect, 999_999, 70_001), "unaligned");
    }
}

/// A streamOptimized VMDK as QEMU converts it, and the same with its grain directory moved to
/// the footer as VMware's exports write it.
fn make_stream(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let src = make(
        dir,
        &format!("{name}.src.vmdk"),
        "subformat=monolithicSparse",
        16 * MIB,
        seed,
    );
    let img = dir.join(name);
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        p(&src),
        p(&img),
    ]);
    img
}

/// Rewrite a stream image QEMU made into VMware's layout: header gd_offset = GD_AT_END, and a
/// footer (marker, header copy with the real directory, end-of-stream marker) at the end.
fn footer_layout(img: &Path, out: &Path) {
    let mut b = std::fs::read(img).unwrap();
    b.resize(b.len().div_ceil(512) * 512, 0);
    let mut footer_marker = vec![0u8; 512];
    footer_marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    let footer = b[..512].to_vec();
    b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&footer_marker);
    b.extend_from_slice(&footer);
    b.extend_from_slice(&[0u8; 512]);
    std::fs::write(out, b).unwrap();
}

#[test]
fn stream_optimized_reads_and_is_served_read_only() {
    let dir = tmpdir();
    let img = make_stream(dir.path(), "s.vmdk", 7);
    let expect = expect_file(&img);
    let vmw = dir.path().join("vmw.vmdk");
    footer_layout(&img, &vmw);
    // QEMU reads the footer layout too: both must agree with it.
    let expect_vmw = expect_file(&vmw);
    assert_eq!(
        std::fs::read(&expect).unwrap(),
        std::fs::read(&expect_vmw).unwrap()
    );
    for (f, e) in [(&img, &expect), (&vmw, &expect_vmw)] {
        let image = Image::open(f, &rw()).unwrap();
        assert!(
            image.is_read_only(),
            "streamOptimized must be served read-only"
        );
        assert_reads(&image, e, "stream");
        let err = image.write_at(&[1], 0).unwrap_err();
        assert_eq!(err.kind(), imgfs::error::ErrorKind::ReadOnly);
    }
}

/// Writes through the engine: aligned, unaligned, across grains and (for split disks) extents.
fn writes(size: u64) -> Vec<(u64, usize, u64)> {
    let mut w = vec![
        (0, 65536, 1),
        (65536 * 3 + 100, 200_000, 2),
        (5 * MIB - 7, 13, 3),
        (size - 4096, 4096, 4),
        (999_000, 4000, 5),
    ];
    if size > 2048 * MIB {
        w.push((2048 * MIB - 70_000, 150_000, 6));
    }
    w
}

fn write_and_verify(img: &Path, expect: &Path, size: u64) {
    {
        let image = Image::open(img, &rw()).unwrap();
        for (off, len, seed) in writes(size) {
            let b = random_bytes(seed, len);
            image.write_at(&b, off).unwrap();
            pwrite(expect, off, &b).unwrap();
        }
        // Zeroes over unallocated grains, over data (unmapped and not), unaligned.
        for (off, len, unmap) in [
            (8 * MIB, MIB, true),
            (0, 2 * 65536, true),
            (3 * MIB, 65536, false),
            (999_000, 100_000, true),
        ] {
            image.write_zeroes(off, len, unmap).unwrap();
            pwrite(expect, off, &vec![0u8; len as usize]).unwrap();
        }
        image.flush().unwrap();
        image.close().unwrap();
    }
    assert_check_clean("vmdk", img);
    assert_compare("vmdk", img, expect);
    let image = Image::open(img, &ro()).unwrap();
    assert_reads(&image, expect, "reopened");
}

#[test]
fn writes_pass_qemu_check_and_compare() {
    let dir = tmpdir();
    for (i, (opts, size)) in SUBFORMATS.iter().enumerate() {
        let img = make(
            dir.path(),
            &format!("w{i}.vmdk"),
            opts,
            *size,
            10 + i as u64,
        );
        let expect = expect_file(&img);
        write_and_verify(&img, &expect, *size);
    }
}

fn cid(img: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", p(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["cid"].as_u64().unwrap()
}

#[test]
fn delta_disk_over_parent_and_cid_linkage() {
    let dir = tmpdir();
    let base = make_sparse(dir.path(), "base.vmdk", 20);
    for zeroed in ["off", "on"] {
        delta_over(dir.path(), &base, zeroed);
    }
    // The parent changes (its CID too): a child made before is refused.
    let child = dir.path().join("child-on.vmdk");
    qemu_io("vmdk", &base, &["write -P 1 0 512"]);
    let err = Image::open(&child, &ro()).unwrap_err();
    assert!(err.to_string().contains("parent CID"), "{err}");
}

fn delta_over(dir: &Path, base: &Path, zeroed: &str) {
    let child = dir.join(format!("child-{zeroed}.vmdk"));
    let o = format!("zeroed_grain={zeroed}");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        &o,
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        p(&child),
    ]);
    qemu_io("vmdk", &child, &["write -P 0x33 4M 100k"]);
    let base_before = std::fs::read(base).unwrap();
    let expect = expect_file(&child);
    let cid0 = cid(&child);
    {
        let image = Image::open(&child, &rw()).unwrap();
        assert_eq!(image.backing().unwrap().format(), "vmdk");
        assert_reads(&image, &expect, "child");
        // Partial grains over parent data, over the child's own data, and zeroes over both.
        for (off, len, seed) in [
            (100, 1000, 1),
            (4 * MIB + 70_000, 5000, 2),
            (1_100_000, 70_000, 3),
        ] {
            let b = random_bytes(seed, len);
            image.write_at(&b, off).unwrap();
            pwrite(&expect, off, &b).unwrap();
        }
        // Zeroes over the child's data and over parent data the child never wrote.
        for (off, len) in [(0, 65536 * 2), (65536 * 5, 65536 * 3), (4 * MIB, 65536)] {
            image.write_zeroes(off, len, true).unwrap();
            pwrite(&expect, off, &vec![0u8; len as usize]).unwrap();
        }
        image.close().unwrap();
    }
    assert_eq!(std::fs::read(base).unwrap(), base_before, "parent changed");
    assert_check_clean("vmdk", &child);
    assert_compare("vmdk", &child, &expect);
    assert_ne!(cid(&child), cid0, "CID must change on the first write");
}

fn imgfs(args: &[&str]) -> (i32, String) {
    let out = run(IMGFS, args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn create_makes_what_qemu_accepts() {
    let dir = tmpdir();
    let cases = [
        (
            "subformat=monolithicSparse,adapter_type=lsilogic",
            16 * MIB,
            "monolithicSparse",
        ),
        ("subformat=monolithicFlat", 16 * MIB, "monolithicFlat"),
        (
            "subformat=twoGbMaxExtentSparse",
            SPLIT_SIZE,
            "twoGbMaxExtentSparse",
        ),
        (
            "subformat=twoGbMaxExtentFlat,compat6=on",
            SPLIT_SIZE,
            "twoGbMaxExtentFlat",
        ),
        ("zeroed_grain=on", 16 * MIB, "monolithicSparse"),
        ("subformat=streamOptimized", 16 * MIB, "streamOptimized"),
    ];
    for (i, (opts, size, ty)) in cases.into_iter().enumerate() {
        let img = dir.path().join(format!("c{i}.vmdk"));
        let (code, out) = imgfs(&[
            "create",
            "-f",
            "vmdk",
            "-o",
            opts,
            p(&img),
            &size.to_string(),
        ]);
        assert_eq!(code, 0, "{opts}: {out}");
        assert_check_clean("vmdk", &img);
        let info = qemu_img(&["info", "--output=json", p(&img)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"].as_u64(), Some(size), "{opts}");
        assert_eq!(
            v["format-specific"]["data"]["create-type"].as_str(),
            Some(ty)
        );
        if ty == "streamOptimized" {
            continue;
        }
        let expect = expect_file(&img);
        write_and_verify(&img, &expect, size);
        let (code, out) = imgfs(&["check", p(&img)]);
        assert_eq!(code, 0, "imgfs check {opts}: {out}");
    }
    // A delta disk made by imgfs over a qemu-made parent.
    let base = make_sparse(dir.path(), "b.vmdk", 30);
    let child = dir.path().join("d.vmdk");
    let (code, out) = imgfs(&["create", "-f", "vmdk", "-b", "b.vmdk", p(&child)]);
    assert_eq!(code, 0, "{out}");
    assert_check_clean("vmdk", &child);
    assert_compare("vmdk", &child, &expect_file(&base));
    let (code, out) = imgfs(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=bogus",
        p(&child),
        "1M",
    ]);
    assert_ne!(code, 0);
    assert!(out.contains("subformat"), "{out}");
}

#[test]
fn check_finds_and_repairs_damage() {
    let dir = tmpdir();
    let img = make_sparse(dir.path(), "k.vmdk", 40);
    assert_eq!(imgfs(&["check", p(&img)]).0, 0);
    let mut b = std::fs::read(&img).unwrap();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    // Second grain entry -> past the end of the file; a leaked grain appended.
    b[gt + 4..gt + 8].copy_from_slice(&0x0100_0000u32.to_le_bytes());
    b.extend_from_slice(&[0xabu8; 65536]);
    std::fs::write(&img, &b).unwrap();
    let (code, out) = imgfs(&["check", p(&img)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("outside the file"), "{out}");
    let (code, out) = imgfs(&["check", "-r", "all", p(&img)]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(imgfs(&["check", p(&img)]).0, 0);
    assert_check_clean("vmdk", &img);
    let (code, out) = imgfs(&["info", "--json", p(&img)]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format_specific"]["create_type"], "monolithicSparse");
    assert_eq!(v["format_specific"]["extents"][0]["type"], "SPARSE");
}

fn open_err(img: &Path) -> imgfs::error::Error {
    Image::open(img, &ro()).unwrap_err()
}

#[test]
fn hostile_descriptors_and_headers_are_refused() {
    let dir = tmpdir();
    let d = dir.path();
    let desc = |ext: &str| {
        format!("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n{ext}\n")
    };
    // The classic: a flat extent naming a host file. Never opened.
    for (i, ext) in [
        "RW 8 FLAT \"/etc/shadow\" 0",
        "RW 8 FLAT \"../escape.vmdk\" 0",
        "RW 8 FLAT \"nbd://host/x\" 0",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(d.join("escape.vmdk"), vec![0u8; 4096]).unwrap();
        let sub = d.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let img = write_file(&sub, &format!("h{i}.vmdk"), desc(ext).as_bytes());
        let e = open_err(&img);
        assert_eq!(e.kind(), imgfs::error::ErrorKind::Permission, "{ext}: {e}");
    }
    // Parent outside the directory.
    let img = write_file(
        d,
        "p.vmdk",
        b"# Disk DescriptorFile\nCID=1\nparentCID=2\ncreateType=\"monolithicFlat\"\nparentFileNameHint=\"/etc/passwd\"\nRW 8 ZERO\n",
    );
    assert_eq!(open_err(&img).kind(), imgfs::error::ErrorKind::Permission);
    // Bounds: too many extents, an over-large descriptor, a huge extent.
    let many = desc(&"RW 1 ZERO\n".repeat(5000));
    assert!(open_err(&write_file(d, "m.vmdk", many.as_bytes()))
        .to_string()
        .contains("extents"));
    let mut big = desc("RW 1 ZERO").into_bytes();
    big.resize(2 << 20, b'#');
    assert!(open_err(&write_file(d, "big.vmdk", &big))
        .to_string()
        .contains("1 MiB"));
    let huge = desc("RW 999999999999999 ZERO");
    assert!(open_err(&write_file(d, "huge.vmdk", huge.as_bytes()))
        .to_string()
        .contains("64 TiB"));
    // Sparse header fields: grain size, GT size, directory outside the file, version.
    let good = make_sparse(d, "g.vmdk", 50);
    let base = std::fs::read(&good).unwrap();
    for (at, val, what) in [
        (20usize, 3u64, "power of two"),
        (20, 1 << 30, "power of two"),
        (44, 4096, "grain tables"),
        (56, 1 << 40, "outside the file"),
        (4, 9, "version"),
        (12, u64::MAX / 2, "64 TiB"),
        // Found by the open_vmdk fuzz target: a sector offset whose byte offset overflows.
        (28, u64::MAX, "outside any file"),
    ] {
        let mut b = base.clone();
        if at == 44 || at == 4 {
            b[at..at + 4].copy_from_slice(&(val as u32).to_le_bytes());
        } else {
            b[at..at + 8].copy_from_slice(&val.to_le_bytes());
        }
        let img = write_file(d, "bad.vmdk", &b);
        let e = open_err(&img);
        assert!(e.to_string().contains(what), "{what}: {e}");
    }
    // A grain table entry outside the file fails its own range, not the whole disk.
    let mut b = base.clone();
    let gd = u64::from_le_bytes(b[56..64].try_into().unwrap()) as usize * 512;
    let gt = u32::from_le_bytes(b[gd..gd + 4].try_into().unwrap()) as usize * 512;
    b[gt..gt + 4].copy_from_slice(&0x0fff_0000u32.to_le_bytes());
    let img = write_file(d, "gte.vmdk", &b);
    let image = Image::open(&img, &ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        image.read_at(&mut buf, 0).unwrap_err().kind(),
        imgfs::error::ErrorKind::Corrupt
    );
    image.read_at(&mut buf, 3 * MIB).unwrap();
    assert_eq!(buf, vec![0x5au8; 4096]);
}

/// Seeded mutations of a small sparse image and of a descriptor: open and read never panic.
#[test]
fn mutated_images_never_panic() {
    let dir = tmpdir();
    let good = make(
        dir.path(),
        "f.vmdk",
        "subformat=monolithicSparse",
        4 * MIB,
        60,
    );
    let base = std::fs::read(&good).unwrap();
    let stream = make_stream(dir.path(), "fs.vmdk", 61);
    let sbase = std::fs::read(&stream).unwrap();
    let mut rng = imgfs::host::SplitMix64::new(99);
    for round in 0..300 {
        let src = if round % 3 == 0 { &sbase } else { &base };
        let mut b = src.clone();
        for _ in 0..1 + rng.below(8) {
            let at = if rng.below(2) == 0 {
                rng.below(1024) as usize
            } else {
                rng.below(b.len() as u64) as usize
            };
            b[at] = rng.next_u64() as u8;
        }
        let img = write_file(dir.path(), "mut.vmdk", &b);
        if let Ok(image) = Image::open(&img, &ro()) {
            let mut buf = vec![0u8; 256 * 1024];
            for off in [0u64, MIB, 3 * MIB] {
                if off + buf.len() as u64 <= image.size() {
                    let _ = image.read_at(&mut buf, off);
                }
            }
        }
    }
}

#[test]
fn split_disk_mounts_and_writes_through_fuse() {
    let dir = tmpdir();
    let img = make(
        dir.path(),
        "m.vmdk",
        "subformat=twoGbMaxExtentSparse",
        SPLIT_SIZE,
        70,
    );
    let expect = expect_file(&img);
    {
        let m = Mount::new(&[&img], &dir.path().join("mnt"), &[]);
        let f = m.file("m.raw");
        assert_eq!(std::fs::metadata(&f).unwrap().len(), SPLIT_SIZE);
        let off = 2048 * MIB - 3000;
        assert_same(
            &pread(&f, off, 6000),
            &pread(&expect, off, 6000),
            "across extents",
        );
        let b = random_bytes(71, 100_000);
        pwrite(&f, off, &b).unwrap();
        pwrite(&expect, off, &b).unwrap();
        let (ok, err) = m.umount();
        assert!(ok, "{err}");
    }
    assert_check_clean("vmdk", &img);
    assert_compare("vmdk", &img, &expect);
}

#[test]
fn ova_appliance_mounts_without_extracting() {
    let dir = tmpdir();
    let d = dir.path();
    let s1 = make_stream(d, "disk1.vmdk", 80);
    let s2 = make_stream(d, "disk2.vmdk", 81);
    std::fs::write(d.join("app.ovf"), "<?xml version=\"1.0\"?>\n<Envelope/>\n").unwrap();
    let ova = d.join("app.ova");
    // OVF first, then the disks; GNU format so a long member name goes through a 'L' record.
    let long = format!("{}.vmdk", "d".repeat(120));
    std::fs::copy(&s2, d.join(&long)).unwrap();
    ok(
        "tar",
        &[
            "--format=gnu",
            "-C",
            p(d),
            "-cf",
            p(&ova),
            "app.ovf",
            "disk1.vmdk",
            &long,
        ],
    );
    let (code, out) = imgfs(&["info", p(&ova)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("2 disks") && out.contains("disk1.vmdk"),
        "{out}"
    );
    let m = Mount::new(&[&ova], &d.join("mnt"), &[]);
    let e1 = expect_file(&s1);
    let e2 = expect_file(&s2);
    assert_same(
        &std::fs::read(m.file("disk1.raw")).unwrap(),
        &std::fs::read(&e1).unwrap(),
        "disk1",
    );
    let name2 = format!("{}.raw", "d".repeat(120));
    assert_same(
        &std::fs::read(m.file(&name2)).unwrap(),
        &std::fs::read(&e2).unwrap(),
        "disk2",
    );
    let err = pwrite(&m.file("disk1.raw"), 0, b"x").unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES)),
        "{err}"
    );
    let (ok_, msg) = m.umount();
    assert!(ok_, "{msg}");
    // A tar without disks is refused with one clear line.
    let empty = d.join("empty.ova");
    ok("tar", &["-C", p(d), "-cf", p(&empty), "app.ovf"]);
    let (code, out) = imgfs(&["info", p(&empty)]);
    assert_ne!(code, 0);
    assert!(out.contains("no .vmdk disk"), "{out}");
}
