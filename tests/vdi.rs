//! VDI end to end: dynamic and static images from qemu-img read equal to `qemu-img convert`,
//! writes through the engine pass `qemu-img check` and `compare`, `imgfs create` images are
//! what QEMU reads, `check` finds and repairs damage, and VirtualBox differencing chains (built
//! here by writing headers as the layout documents them) find their parent by UUID.

mod common;

use common::*;
use imgfs::{Image, OpenOpts};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn opts(read_only: bool) -> OpenOpts {
    OpenOpts {
        read_only,
        ..OpenOpts::default()
    }
}

fn qemu_create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "vdi"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let s = size.to_string();
    args.extend([p.to_str().unwrap(), &s]);
    qemu_img(&args);
    p
}

fn fill_with_qemu(dir: &Path, img: &Path, size: u64, seed: u64) {
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let mut cmds = vec![];
    for i in 0..6 {
        let len = 512 * (1 + rng.below(3000));
        let off = rng.below(size - len) / 512 * 512;
        let f = write_file(
            dir,
            &format!("r{seed}-{i}"),
            &random_bytes(seed * 10 + i, len as usize),
        );
        cmds.push(format!("write -s {} {off} {len}", f.display()));
    }
    cmds.push(format!("write -P 0x5a {} 4096", size - 4096));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("vdi", img, &refs);
}

#[test]
fn reads_equal_qemu_and_writes_pass_qemu_check() {
    let d = tmpdir();
    for (i, o) in ["", "static=on"].iter().enumerate() {
        let size = 20 * MIB + 512 * (i as u64 * 3);
        let img = qemu_create(d.path(), &format!("v{i}.vdi"), o, size);
        fill_with_qemu(d.path(), &img, size, i as u64 + 1);
        let mut want = qemu_raw(&img);
        let im = Image::open(&img, &opts(false)).unwrap();
        assert_eq!(im.size(), size);
        assert_same(&engine_read_all(&im), &want, o);
        write_block_pattern(&im, &mut want, 10 * i as u64, MIB, 8 * MIB);
        im.close().unwrap();
        drop(im);
        assert_check_clean("vdi", &img);
        assert_compare_bytes("vdi", &img, &want);
        assert_same(&open_read_all(&img, true), &want, "reopened");
    }
}

#[test]
fn create_static_and_dynamic_read_by_qemu() {
    let d = tmpdir();
    for o in ["static=off", "static=on"] {
        let img = d.path().join("c.vdi");
        let _ = std::fs::remove_file(&img);
        let out = run(
            IMGFS,
            &[
                "create",
                "-f",
                "vdi",
                "-o",
                o,
                img.to_str().unwrap(),
                "5000000",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_check_clean("vdi", &img);
        // Block data on a 1 MiB boundary, as VirtualBox places it.
        let h = std::fs::read(&img).unwrap();
        let data = u32::from_le_bytes(h[0x158..0x15c].try_into().unwrap()) as u64;
        assert_eq!(data % MIB, 0, "{o}: data at {data:#x}");
        qemu_io("vdi", &img, &["write -P 0x42 1M 100000"]);
        // An odd size is rounded up to whole sectors, as QEMU reads it.
        let mut want = vec![0u8; 5_000_192];
        want[MIB as usize..MIB as usize + 100000].fill(0x42);
        assert_same(&open_read_all(&img, true), &want, o);
        let im = Image::open(&img, &opts(false)).unwrap();
        im.write_at(&[9; 7000], 4_990_000).unwrap();
        im.close().unwrap();
        drop(im);
        want[4_990_000..4_997_000].fill(9);
        assert_check_clean("vdi", &img);
        assert_compare_bytes("vdi", &img, &want);
    }
}

#[test]
fn check_finds_and_repairs_damage() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "k.vdi", "", 8 * MIB);
    qemu_io(
        "vdi",
        &img,
        &["write -P 1 0 1M", "write -P 2 2M 1M", "write -P 3 4M 1M"],
    );
    let p = img.to_str().unwrap();
    let mut b = std::fs::read(&img).unwrap();
    // Entry 2 (block 2M) duplicates entry 0's block index; entry 5 names index 200.
    b[512 + 8..512 + 12].copy_from_slice(&0u32.to_le_bytes());
    b[512 + 20..512 + 24].copy_from_slice(&200u32.to_le_bytes());
    std::fs::write(&img, &b).unwrap();
    assert_eq!(qemu_check("vdi", &img).0, 2, "QEMU sees it too");
    let out = run(IMGFS, &["check", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("also used by") && text.contains("past the image"),
        "{text}"
    );
    ok(IMGFS, &["check", "-r", "all", p]);
    assert_check_clean("vdi", &img);
    let raw = qemu_raw(&img);
    assert!(raw[..MIB as usize].iter().all(|&x| x == 1));
    assert!(raw[2 * MIB as usize..3 * MIB as usize]
        .iter()
        .all(|&x| x == 0));
    assert!(raw[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&x| x == 3));
    // Repair freed index 1 below index 2: it moved block 4M down, so QEMU, which allocates at
    // the count, does not write over it.
    qemu_io("vdi", &img, &["write -P 4 6M 1M"]);
    assert_check_clean("vdi", &img);
    let raw = qemu_raw(&img);
    assert!(raw[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&x| x == 3));
    assert!(raw[6 * MIB as usize..7 * MIB as usize]
        .iter()
        .all(|&x| x == 4));
}

#[test]
fn differencing_chain_found_by_uuid() {
    let d = tmpdir();
    let parent = qemu_create(d.path(), "base.vdi", "", 6 * MIB);
    qemu_io("vdi", &parent, &["write -P 0x11 0 6M"]);
    let parent_bytes = std::fs::read(&parent).unwrap();
    let child = d.path().join("child.vdi");
    vdi_differencing_child(&parent, &child);
    let mut want = vec![0x11u8; 6 * MIB as usize];
    want[MIB as usize..2 * MIB as usize].fill(0xc1);
    want[3 * MIB as usize..4 * MIB as usize].fill(0);
    assert_same(&open_read_all(&child, true), &want, "child");
    // Writes over parent data (partial blocks, across blocks) keep the parent's bytes around.
    let im = Image::open(&child, &opts(false)).unwrap();
    for (i, &(off, len)) in [(100u64, 10u64), (2 * MIB - 5, 10), (5 * MIB + 3, 4096)]
        .iter()
        .enumerate()
    {
        let data = random_bytes(i as u64 + 70, len as usize);
        im.write_at(&data, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    im.write_zeroes(4 * MIB, MIB, true).unwrap();
    want[4 * MIB as usize..5 * MIB as usize].fill(0);
    im.close().unwrap();
    drop(im);
    assert_eq!(
        std::fs::read(&parent).unwrap(),
        parent_bytes,
        "parent changed"
    );
    assert_same(&open_read_all(&child, true), &want, "child after writes");
    ok(IMGFS, &["check", child.to_str().unwrap()]);

    // A copy of the parent beside it: ambiguous, refused.
    let copy = d.path().join("copy.vdi");
    std::fs::copy(&parent, &copy).unwrap();
    let e = Image::open(&child, &opts(true)).unwrap_err().to_string();
    assert!(e.contains("ambiguous") && e.contains("copy.vdi"), "{e}");
    std::fs::remove_file(&copy).unwrap();
    // Parent elsewhere: not found, unless --backing-dir names its directory.
    let other = tmpdir();
    std::fs::rename(&parent, other.path().join("base.vdi")).unwrap();
    let e = Image::open(&child, &opts(true)).unwrap_err().to_string();
    assert!(
        e.contains("not found") && e.contains("--backing-dir"),
        "{e}"
    );
    let o = OpenOpts {
        backing_dir: Some(other.path().to_path_buf()),
        ..opts(true)
    };
    assert_same(
        &engine_read_all(&Image::open(&child, &o).unwrap()),
        &want,
        "--backing-dir",
    );
    let mnt = d.path().join("mnt");
    let m = Mount::new(
        &[&child],
        &mnt,
        &[
            "--read-only",
            "--backing-dir",
            other.path().to_str().unwrap(),
        ],
    );
    assert_same(
        &std::fs::read(m.file("child.raw")).unwrap(),
        &want,
        "mounted",
    );
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    // A parent modified since the child was made is refused.
    let moved = other.path().join("base.vdi");
    let mut b = std::fs::read(&moved).unwrap();
    b[0x198] ^= 1;
    std::fs::write(&moved, b).unwrap();
    let e = Image::open(&child, &o).unwrap_err().to_string();
    assert!(e.contains("modification UUID"), "{e}");
}

#[test]
fn mounted_vdi_writes_pass_qemu_check() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "m.vdi", "", 12 * MIB);
    fill_with_qemu(d.path(), &img, 12 * MIB, 5);
    let mut want = qemu_raw(&img);
    let mnt = d.path().join("mnt");
    let m = Mount::new(&[&img], &mnt, &[]);
    let f = m.file("m.raw");
    assert_same(&std::fs::read(&f).unwrap(), &want, "mounted");
    for (i, &(off, len)) in [(100u64, 7000usize), (MIB - 3, 9), (5 * MIB, MIB as usize)]
        .iter()
        .enumerate()
    {
        let data = random_bytes(60 + i as u64, len);
        pwrite(&f, off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    assert_check_clean("vdi", &img);
    assert_compare_bytes("vdi", &img, &want);
}
