//! Growing the disk: online through a real mount (truncate(1), ftruncate, fallocate past the
//! end) for every writable format, shrink refused, offline `imgfs resize` against `qemu-img
//! resize`, and the image lock refusing an offline resize of a mounted image. QEMU is the
//! oracle: `qemu-img info` shows the new size, `check` is clean and `compare` matches the
//! expected bytes after umount.

mod common;
use common::*;
use common::{imgfs_cmd as imgfs, qemu_virtual_size as virtual_size};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// qemu-img check must be clean where QEMU can check the format (raw and qcow it cannot).
fn check_if_checkable(fmt: &str, img: &Path) {
    if fmt != "raw" && fmt != "qcow" {
        assert_check_clean(fmt, img);
    }
}

fn create(fmt: &str, opts: &str, img: &Path, size: &str) {
    TestImage::build_at(img, fmt).opts(opts).size(size).qemu();
}

/// Apply a write to the expected bytes, growing them as the disk grows.
fn put(want: &mut [u8], off: u64, data: &[u8]) {
    want[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// Grow a 4 MiB disk to 12, 20 and then 24 MiB through the mount (truncate(1), ftruncate,
/// fallocate), write across the old end and into the new range, and let QEMU judge the image.
fn grow_online(fmt: &str, opts: &str) {
    grow_online_with(fmt, opts, &[]);
}

fn grow_online_with(fmt: &str, opts: &str, mount_args: &[&str]) {
    let t = tmpdir();
    let img = t.path().join(format!("disk.{fmt}"));
    create(fmt, opts, &img, "4M");
    qemu_io(
        fmt,
        &img,
        &["write -P 0x5a 1M 64k", "write -P 0x33 3968k 128k"],
    );
    let mut want = qemu_raw(&img);
    let m = Mount::new(&[&img], &t.path().join("m"), mount_args);
    let disk = m.file("disk.raw");

    ok("truncate", &["-s", "12M", disk.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        12 * MIB,
        "stat after truncate(1)"
    );
    want.resize(12 * MIB as usize, 0);
    assert_same(
        &pread(&disk, 0, 12 * MIB as usize),
        &want,
        "after truncate -s 12M",
    );

    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    f.set_len(20 * MIB).unwrap();
    assert_eq!(
        f.metadata().unwrap().len(),
        20 * MIB,
        "fstat after ftruncate"
    );
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        20 * MIB,
        "stat after ftruncate"
    );
    want.resize(20 * MIB as usize, 0);

    // fallocate mode 0 past the end grows; KEEP_SIZE past the end leaves the size alone.
    ok("fallocate", &["-l", "24M", disk.to_str().unwrap()]);
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        24 * MIB,
        "after fallocate"
    );
    ok(
        "fallocate",
        &["-n", "-o", "30M", "-l", "1M", disk.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        24 * MIB,
        "after fallocate -n"
    );
    want.resize(24 * MIB as usize, 0);

    // Writes across the old end, deep in the new range and at its very end.
    for (i, (off, len)) in [
        (4 * MIB - 1000, 3000u64),
        (11 * MIB + 4097, 70000),
        (17 * MIB, 2 * MIB),
        (24 * MIB - 512, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let data = random_bytes(i as u64 + 1, len as usize);
        f.write_all_at(&data, off).unwrap();
        put(&mut want, off, &data);
    }
    f.sync_all().unwrap();
    assert_same(
        &pread(&disk, 0, 24 * MIB as usize),
        &want,
        "through the mount",
    );
    // Past the end is still past the end (with passthrough the kernel writes the host file
    // itself and would extend it: not asked there).
    if !mount_args.contains(&"--passthrough") {
        assert!(
            f.write_all_at(b"x", 24 * MIB).is_err(),
            "write past the grown end"
        );
    }
    drop(f);
    m.umount_ok();

    assert_eq!(virtual_size(&img), 24 * MIB, "qemu-img info after umount");
    check_if_checkable(fmt, &img);
    assert_compare_bytes(fmt, &img, &want);
}

#[test]
fn grow_online_raw() {
    grow_online("raw", "");
}

#[test]
fn grow_online_raw_passthrough() {
    // The kernel does the raw image's I/O itself; resizes still come to imgfs.
    grow_online_with("raw", "", &["--format", "raw", "--passthrough"]);
}

#[test]
fn grow_online_qcow2_moves_the_l1_table() {
    // 4 KiB clusters: one L2 table maps 2 MiB, so 4 -> 24 MiB needs 12 L1 entries instead of 2.
    grow_online("qcow2", "cluster_size=4096");
}

#[test]
fn grow_online_qcow2_v2_lazy() {
    grow_online("qcow2", "compat=0.10");
    grow_online("qcow2", "lazy_refcounts=on,cluster_size=65536");
}

#[test]
fn grow_online_qed() {
    grow_online("qed", "cluster_size=4096");
}

#[test]
fn grow_online_qcow() {
    grow_online("qcow", "");
}

#[test]
fn grow_online_vhdx() {
    grow_online("vhdx", "block_size=1M");
}

#[test]
fn shrinking_online_is_refused_and_changes_nothing() {
    let t = tmpdir();
    let img = t.path().join("disk.qcow2");
    create("qcow2", "", &img, "8M");
    qemu_io("qcow2", &img, &["write -P 0x11 7M 1M"]);
    let want = qemu_raw(&img);
    let m = Mount::new(&[&img], &t.path().join("m"), &[]);
    let disk = m.file("disk.raw");
    let out = run("truncate", &["-s", "4M", disk.to_str().unwrap()]);
    assert!(!out.status.success(), "shrink must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "EPERM expected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let e = f.set_len(MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "ftruncate shrink: {e}");
    // Same size: a no-op that succeeds.
    f.set_len(8 * MIB).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 * MIB);
    assert_same(
        &pread(&disk, 0, 8 * MIB as usize),
        &want,
        "after refused shrink",
    );
    m.umount_ok();
    assert_eq!(virtual_size(&img), 8 * MIB);
    assert_check_clean("qcow2", &img);
}

#[test]
fn engine_names_both_sizes_when_refusing_a_shrink() {
    let t = tmpdir();
    let img = t.path().join("d.qcow2");
    create("qcow2", "", &img, "8M");
    let image = imgfs::Image::open(&img, &imgfs::image::OpenOpts::default()).unwrap();
    let e = image.resize(4 * MIB).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    let msg = e.to_string();
    assert!(msg.contains("8388608") && msg.contains("4194304"), "{msg}");
    assert_eq!(image.size(), 8 * MIB);
}

#[test]
fn growing_over_a_longer_backing_file_reads_zeros() {
    // QEMU's rule: the new range must not show the backing file's bytes.
    for compat in ["1.1", "0.10"] {
        let t = tmpdir();
        let base = t.path().join("base.qcow2");
        create("qcow2", "", &base, "16M");
        qemu_io("qcow2", &base, &["write -P 0x77 0 16M"]);
        let top = TestImage::build(t.path(), "top.qcow2", "qcow2")
            .opt("compat", compat)
            .backing("base.qcow2", Some("qcow2"))
            .size("4M")
            .qemu()
            .path;
        let m = Mount::new(&[&top], &t.path().join("m"), &[]);
        let disk = m.file("top.raw");
        ok("truncate", &["-s", "20M", disk.to_str().unwrap()]);
        let got = pread(&disk, 0, 20 * MIB as usize);
        let mut want = vec![0x77u8; 4 * MIB as usize];
        want.resize(20 * MIB as usize, 0);
        assert_same(&got, &want, &format!("compat={compat} through the mount"));
        m.umount_ok();
        assert_check_clean("qcow2", &top);
        assert_compare_bytes("qcow2", &top, &want);
    }
}

/// `imgfs resize` and `qemu-img resize` give the same guest view and size.
#[test]
fn offline_resize_matches_qemu_img() {
    let t = tmpdir();
    for (fmt, opts) in [("raw", ""), ("qcow2", "cluster_size=4096"), ("qed", "")] {
        let ours = t.path().join(format!("ours.{fmt}"));
        let theirs = t.path().join(format!("theirs.{fmt}"));
        create(fmt, opts, &ours, "4M");
        qemu_io(fmt, &ours, &["write -P 0x42 3M 1M"]);
        std::fs::copy(&ours, &theirs).unwrap();
        for arg in ["+5M", "64M", "64M"] {
            let (code, out, err) = imgfs(&["resize", "-f", fmt, ours.to_str().unwrap(), arg]);
            assert_eq!(code, 0, "{fmt} imgfs resize {arg}: {err}");
            assert!(out.contains("Image resized."), "{out}");
            qemu_img(&["resize", "-q", "-f", fmt, theirs.to_str().unwrap(), arg]);
            assert_eq!(virtual_size(&ours), virtual_size(&theirs), "{fmt} {arg}");
            check_if_checkable(fmt, &ours);
            let cmp = run(
                "qemu-img",
                &["compare", ours.to_str().unwrap(), theirs.to_str().unwrap()],
            );
            assert!(
                cmp.status.success(),
                "{fmt} {arg}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
        // Shrinking without --shrink: exit 1 from both, sizes unchanged.
        let (code, _, err) = imgfs(&["resize", "-f", fmt, ours.to_str().unwrap(), "-1M"]);
        assert_eq!(code, 1, "{fmt}: {err}");
        assert!(err.contains("--shrink"), "{err}");
        let q = run(
            "qemu-img",
            &["resize", "-f", fmt, theirs.to_str().unwrap(), "--", "-1M"],
        );
        assert_eq!(q.status.code(), Some(1));
        assert_eq!(virtual_size(&ours), 64 * MIB);
    }
    // raw shrinks with --shrink exactly as qemu-img does.
    let (ours, theirs) = (t.path().join("ours.raw"), t.path().join("theirs.raw"));
    let (code, _, err) = imgfs(&[
        "resize",
        "--shrink",
        "-f",
        "raw",
        ours.to_str().unwrap(),
        "-60M",
    ]);
    assert_eq!(code, 0, "{err}");
    qemu_img(&[
        "resize",
        "-q",
        "--shrink",
        "-f",
        "raw",
        theirs.to_str().unwrap(),
        "--",
        "-60M",
    ]);
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
    // Formats imgfs cannot shrink say so (exit 1) and keep their size.
    let q = t.path().join("ours.qcow2");
    let (code, _, err) = imgfs(&["resize", "--shrink", q.to_str().unwrap(), "8M"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("shrinking qcow2 images is not supported"),
        "{err}"
    );
    assert_eq!(virtual_size(&q), 64 * MIB);
    // A bad size is an error, not a resize.
    let (code, _, _) = imgfs(&["resize", q.to_str().unwrap(), "lots"]);
    assert_eq!(code, 1);
}

/// QEMU cannot resize qcow or VHDX; imgfs grows them and QEMU reads the result.
#[test]
fn offline_resize_of_formats_qemu_cannot_resize() {
    let t = tmpdir();
    for (fmt, opts) in [("qcow", ""), ("vhdx", "block_size=1M")] {
        let img = t.path().join(format!("d.{fmt}"));
        create(fmt, opts, &img, "4M");
        qemu_io(fmt, &img, &["write -P 0x42 3M 1M"]);
        let mut want = qemu_raw(&img);
        let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "+60M"]);
        assert_eq!(code, 0, "{fmt}: {err}");
        assert_eq!(virtual_size(&img), 64 * MIB, "{fmt}");
        qemu_io(fmt, &img, &["write -P 0x24 40M 1M"]);
        want.resize(64 * MIB as usize, 0);
        want[40 * MIB as usize..41 * MIB as usize].fill(0x24);
        check_if_checkable(fmt, &img);
        assert_compare_bytes(fmt, &img, &want);
    }
    // VHDX: a size past what the BAT region can map is refused with the limit.
    let img = t.path().join("d.vhdx");
    let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "60T"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("BAT region") && err.contains("maps at most"),
        "{err}"
    );
    assert_eq!(virtual_size(&img), 64 * MIB);
}

#[test]
fn qed_growth_past_its_table_geometry_is_a_clear_error() {
    let t = tmpdir();
    let img = t.path().join("d.qed");
    // 4 KiB clusters, 2-cluster tables: 1024 * 1024 * 4 KiB = 4 GiB at most. (QEMU cannot
    // reopen QED images with 1-cluster tables.)
    create("qed", "cluster_size=4096,table_size=2", &img, "4M");
    let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "5G"]);
    assert_eq!(code, 1);
    assert!(err.contains("maps at most 4294967296 bytes"), "{err}");
    let q = run(
        "qemu-img",
        &["resize", "-f", "qed", img.to_str().unwrap(), "5G"],
    );
    assert_eq!(q.status.code(), Some(1), "QEMU refuses it too");
    let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "4G"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(virtual_size(&img), 4 << 30);
    assert_check_clean("qed", &img);
    qemu_io("qed", &img, &["write -P 0x61 4095M 1M", "read -P 0 4M 1M"]);
    assert_check_clean("qed", &img);
}

#[test]
fn offline_resize_of_a_mounted_image_is_refused_by_the_lock() {
    let t = tmpdir();
    let img = t.path().join("d.qcow2");
    create("qcow2", "", &img, "4M");
    let m = Mount::new(&[&img], &t.path().join("m"), &[]);
    let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "+1M"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lock") || err.contains("in use"), "{err}");
    assert_eq!(std::fs::metadata(m.file("d.raw")).unwrap().len(), 4 * MIB);
    m.umount_ok();
    assert_eq!(virtual_size(&img), 4 * MIB);
    let (code, _, err) = imgfs(&["resize", img.to_str().unwrap(), "+1M"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(virtual_size(&img), 5 * MIB);
}

/// Writes and reads go on while the disk grows (qcow2 with 4 KiB clusters: each step moves the
/// L1 table), and every byte written is there afterwards.
#[test]
fn growing_while_writing() {
    let t = tmpdir();
    let img = t.path().join("disk.qcow2");
    create("qcow2", "cluster_size=4096", &img, "4M");
    let m = Mount::new(&[&img], &t.path().join("m"), &[]);
    let disk = m.file("disk.raw");
    let writer = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut want = vec![0u8; 4 * MIB as usize];
            for i in 0..400u64 {
                let off = (i * 7919 * 4096) % (4 * MIB);
                let data = random_bytes(i, 4096);
                f.write_all_at(&data, off).unwrap();
                put(&mut want, off, &data);
            }
            want
        })
    };
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for step in 1..=8u64 {
        f.set_len(4 * MIB + step * 8 * MIB).unwrap();
        let tail = random_bytes(1000 + step, 512);
        f.write_all_at(&tail, 4 * MIB + step * 8 * MIB - 512)
            .unwrap();
    }
    let mut want = writer.join().unwrap();
    want.resize(68 * MIB as usize, 0);
    for step in 1..=8u64 {
        put(
            &mut want,
            4 * MIB + step * 8 * MIB - 512,
            &random_bytes(1000 + step, 512),
        );
    }
    f.sync_all().unwrap();
    drop(f);
    assert_same(
        &pread(&disk, 0, want.len()),
        &want,
        "after concurrent growth",
    );
    m.umount_ok();
    assert_check_clean("qcow2", &img);
    assert_compare_bytes("qcow2", &img, &want);
}
