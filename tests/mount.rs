//! End to end: real FUSE mounts of raw images through the imgfs binary.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

fn raw_image(dir: &Path, name: &str, size: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = random_bytes(seed, size);
    // Some holes, so SEEK_HOLE and st_blocks have something to find.
    data[size / 2..size / 2 + size / 4].fill(0);
    let p = write_file(dir, name, &data);
    // Make the zero MiB a real hole.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    nix_punch(&f, (size / 2) as i64, (size / 4) as i64);
    (p, data)
}

fn nix_punch(f: &std::fs::File, off: i64, len: i64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on an open file descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    assert_eq!(r, 0);
}

#[test]
fn raw_read_write_unaligned_and_across_boundaries() {
    let t = tmpdir();
    let size = 8 << 20;
    let (img, mut expect) = raw_image(t.path(), "disk.img", size, 1);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("disk.raw");
    let meta = std::fs::metadata(&f).unwrap();
    assert_eq!(meta.len(), size as u64);
    assert_eq!(meta.mode() & 0o777, 0o644);
    assert!(
        meta.blocks() * 512 < size as u64,
        "st_blocks should show the hole"
    );
    assert_same(&std::fs::read(&f).unwrap(), &expect, "initial read");

    // Unaligned writes, across 4 KiB and 1 MiB boundaries, and into the hole.
    let cases: &[(u64, usize)] = &[
        (0, 1),
        (4095, 2),
        (4096 * 3 + 17, 9000),
        ((1 << 20) - 3, 7),
        ((2 << 20) - 4096 - 5, (1 << 20) + 4096 + 11),
        ((size / 2) as u64 + 100, 300_000),
        (size as u64 - 1, 1),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = random_bytes(100 + i as u64, len);
        pwrite(&f, off, &data).unwrap();
        expect[off as usize..off as usize + len].copy_from_slice(&data);
        let start = off.saturating_sub(10);
        let end = off + len as u64;
        let got = pread(&f, start, (end - start) as usize);
        assert_same(&got, &expect[start as usize..end as usize], "read back");
    }
    // dd with odd block sizes.
    let src = write_file(t.path(), "src.bin", &random_bytes(9, 123_457));
    ok(
        "dd",
        &[
            &format!("if={}", src.display()),
            &format!("of={}", f.display()),
            "bs=3333",
            "seek=7",
            "oflag=seek_bytes",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
    let s = std::fs::read(&src).unwrap();
    expect[7..7 + s.len()].copy_from_slice(&s);
    // Writing past the end fails like a block device.
    let e = pwrite(&f, size as u64, b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    let (ok_, err) = m.umount();
    assert!(ok_, "umount: {err}");
    assert_same(&std::fs::read(&img).unwrap(), &expect, "image after umount");
}

#[test]
fn partition_mkfs_mount_roundtrip() {
    let t = tmpdir();
    let img = t.path().join("disk.img");
    ok("truncate", &["-s", "64M", img.to_str().unwrap()]);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("disk.raw");
    // A GPT with one partition, written by sfdisk on the exposed file.
    let mut sf = Command::new("sfdisk")
        .args(["--quiet", f.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    sf.stdin
        .as_mut()
        .unwrap()
        .write_all(b"label: gpt\nstart=2048, type=linux\n")
        .unwrap();
    assert!(sf.wait().unwrap().success());
    let list = ok("sfdisk", &["-l", f.to_str().unwrap()]);
    assert!(list.contains("Linux filesystem"), "{list}");
    // This kernel makes no partition devices: reach the partition by offset.
    let lo = Loop::new(&f, &["-o", &(2048 * 512).to_string()]);
    ok("mkfs.ext4", &["-q", "-F", &lo.dev]);
    let payload = random_bytes(42, 3 << 20);
    {
        let km = KernelMount::new(&lo.dev, &t.path().join("ext4"));
        std::fs::write(km.dir.join("file.bin"), &payload).unwrap();
        ok("sync", &[]);
    }
    {
        let km = KernelMount::new(&lo.dev, &t.path().join("ext4"));
        assert_same(
            &std::fs::read(km.dir.join("file.bin")).unwrap(),
            &payload,
            "ext4 file",
        );
    }
    drop(lo);
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    // After umount, the raw image holds the file system: fsck it directly at the offset.
    let lo = Loop::new(&img, &["-o", &(2048 * 512).to_string()]);
    let out = run("e2fsck", &["-fn", &lo.dev]);
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn read_only_mount_refuses_writes_and_never_touches_the_image() {
    let t = tmpdir();
    let (img, expect) = raw_image(t.path(), "ro.img", 2 << 20, 3);
    let before = std::fs::metadata(&img).unwrap().mtime_nsec();
    let m = Mount::new(&[&img], &t.path().join("mnt"), &["--read-only"]);
    let f = m.file("ro.raw");
    assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o444);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_same(&std::fs::read(&f).unwrap(), &expect, "read-only read");
    // A second read-only mount shares the image; a writer is refused.
    let m2 = Mount::new(&[&img], &t.path().join("mnt2"), &["-r"]);
    let e = Mount::try_new(&[&img], &t.path().join("mnt3"), &[])
        .err()
        .unwrap();
    assert!(e.contains("lock"), "{e}");
    drop(m2);
    assert!(m.umount().0);
    assert_eq!(std::fs::read(&img).unwrap(), expect);
    assert_eq!(std::fs::metadata(&img).unwrap().mtime_nsec(), before);
}

#[test]
fn second_writer_and_qemu_are_refused_while_mounted() {
    let t = tmpdir();
    let (img, _) = raw_image(t.path(), "lock.img", 2 << 20, 4);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let e = Mount::try_new(&[&img], &t.path().join("mnt2"), &[])
        .err()
        .unwrap();
    assert!(e.contains("lock.img") && e.contains("lock"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one-line reason: {e}");
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write 0 512", img.to_str().unwrap()],
    );
    assert!(
        !out.status.success(),
        "qemu-io must not write a mounted image"
    );
    drop(m);
    // Once unmounted, QEMU may write again.
    qemu_io("raw", &img, &["write 0 512"]);
}

#[test]
fn bad_inputs_give_one_line_errors_naming_the_file() {
    let t = tmpdir();
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let missing = t.path().join("missing.qcow2");
    let e1 = Mount::try_new(&[&missing], &mnt, &[]).err().unwrap();
    assert!(
        e1.contains("missing.qcow2") && e1.contains("No such file"),
        "{e1}"
    );
    let (img, _) = raw_image(t.path(), "x.img", 1 << 20, 5);
    let e2 = Mount::try_new(&[&img], &img, &[]).err().unwrap();
    assert!(e2.contains("not a directory"), "{e2}");
    let e3 = Mount::try_new(&[&img], &mnt, &["--format", "nosuch"])
        .err()
        .unwrap();
    assert!(e3.contains("unknown format"), "{e3}");
    for e in [&e1, &e2, &e3] {
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    assert!(!is_mounted(&mnt));
}

#[test]
fn sigterm_and_plain_umount_close_cleanly() {
    let t = tmpdir();
    let (img, mut expect) = raw_image(t.path(), "sig.img", 2 << 20, 6);
    for how in ["sigterm", "umount"] {
        let mnt = t.path().join(format!("mnt-{how}"));
        let m = Mount::new(&[&img], &mnt, &[]);
        let pid = m.pid();
        let data = random_bytes(7, 5000);
        // Written by dd, not through a descriptor of this process: a child that another test
        // thread forks would share that descriptor until its exec and make umount(8) "busy".
        let src = write_file(t.path(), "sig.data", &data);
        let of = format!("of={}", m.file("sig.raw").display());
        let dd_if = format!("if={}", src.display());
        ok(
            "dd",
            &[
                &dd_if,
                &of,
                "bs=5000",
                "count=1",
                "seek=1234",
                "oflag=seek_bytes",
                "conv=notrunc,fsync",
                "status=none",
            ],
        );
        expect[1234..1234 + 5000].copy_from_slice(&data);
        if how == "sigterm" {
            ok("kill", &["-TERM", &pid.to_string()]);
        } else {
            ok("umount", &[mnt.to_str().unwrap()]);
        }
        assert!(
            wait_until(10, || !process_alive(pid)),
            "{how}: daemon still running"
        );
        assert!(!is_mounted(&mnt), "{how}: still mounted");
        std::mem::forget(m);
        assert_eq!(std::fs::read(&img).unwrap(), expect, "{how}");
    }
}

#[test]
fn punch_hole_zero_range_and_seek_data() {
    let t = tmpdir();
    let (img, mut expect) = raw_image(t.path(), "p.img", 4 << 20, 8);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("p.raw");
    ok(
        "fallocate",
        &[
            "--punch-hole",
            "-o",
            "4097",
            "-l",
            "70000",
            f.to_str().unwrap(),
        ],
    );
    expect[4097..4097 + 70000].fill(0);
    ok(
        "fallocate",
        &[
            "--zero-range",
            "-o",
            "1000000",
            "-l",
            "5000",
            f.to_str().unwrap(),
        ],
    );
    expect[1_000_000..1_005_000].fill(0);
    assert_same(&std::fs::read(&f).unwrap(), &expect, "after punch");
    // The hole in the middle of the raw image is visible through SEEK_HOLE.
    use std::os::unix::io::AsRawFd;
    let fh = std::fs::File::open(&f).unwrap();
    // SAFETY: lseek on an open descriptor.
    let hole = unsafe { libc::lseek(fh.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(hole > 0 && hole <= (2 << 20), "first hole at {hole}");
    // SAFETY: as above.
    let data = unsafe { libc::lseek(fh.as_raw_fd(), 2 << 20, libc::SEEK_DATA) };
    assert_eq!(data, (3 << 20), "data resumes after the punched MiB");
    drop(fh);
    assert!(m.umount().0);
    assert_eq!(std::fs::read(&img).unwrap(), expect);
}

#[test]
fn probed_raw_cannot_be_turned_into_a_qcow2() {
    let t = tmpdir();
    let (img, _) = raw_image(t.path(), "guest.img", 1 << 20, 9);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let e = pwrite(&m.file("guest.raw"), 0, b"QFI\xfb\0\0\0\x03").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    pwrite(&m.file("guest.raw"), 512, b"QFI\xfb").unwrap();
    // Nor into a fixed VHD or a DMG by a trailer in its last sector (the next probe looks
    // there), whether the write covers the whole sector or just the signature.
    let last: u64 = (1 << 20) - 512;
    let e = pwrite(&m.file("guest.raw"), last, b"conectix").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let mut tail = vec![0u8; 4096];
    tail[4096 - 512..4096 - 508].copy_from_slice(b"koly");
    let e = pwrite(&m.file("guest.raw"), (1 << 20) - 4096, &tail).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    // The same bytes one sector earlier are just data.
    pwrite(&m.file("guest.raw"), last - 512, b"conectix").unwrap();
    drop(m);
    assert!(!std::fs::read(&img).unwrap()[last as usize..].starts_with(b"conectix"));
    // With an explicit --format raw, the guest owns its first sector.
    let m = Mount::new(&[&img], &t.path().join("mnt"), &["--format", "raw"]);
    pwrite(&m.file("guest.raw"), 0, b"QFI\xfb\0\0\0\x03").unwrap();
}

#[test]
fn several_images_and_directories() {
    let t = tmpdir();
    let d = t.path().join("images");
    std::fs::create_dir(&d).unwrap();
    let (a, ea) = raw_image(&d, "a.img", 1 << 20, 10);
    let (b, eb) = raw_image(&d, "b.raw", 2 << 20, 11);
    std::fs::write(d.join("notes.txt"), b"not an image").unwrap();
    let m = Mount::new(&[&d], &t.path().join("mnt"), &[]);
    let mut names: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a.raw", "b.raw"]);
    assert_eq!(std::fs::read(m.file("a.raw")).unwrap(), ea);
    assert_eq!(std::fs::read(m.file("b.raw")).unwrap(), eb);
    drop(m);
    // Two files sharing a stem keep their full names.
    let (c, _) = raw_image(t.path(), "a.img", 1 << 20, 12);
    let c2 = write_file(t.path(), "a.bin", &[0u8; 4096]);
    let m = Mount::new(&[&c, &c2, &a, &b], &t.path().join("mnt"), &[]);
    let mut names: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["_a.img.raw", "a.bin.raw", "a.img.raw", "b.raw"]);
}

#[test]
fn stats_are_readable_as_xattrs() {
    let t = tmpdir();
    let (img, _) = raw_image(t.path(), "s.img", 1 << 20, 13);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("s.raw");
    pwrite(&f, 0, &[1u8; 8192]).unwrap();
    let v = ok(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.imgfs.stats",
            f.to_str().unwrap(),
        ],
    );
    let j: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(j["format"], "raw");
    assert_eq!(j["bytes_written"], 8192);
    assert!(
        j["flushes"].as_u64().unwrap() >= 1,
        "fsync reached the image: {j}"
    );
    assert_eq!(j["state"], "read-write");
}

#[test]
fn passthrough_serves_raw_images_in_the_kernel_and_keeps_the_guard_otherwise() {
    let t = tmpdir();
    let (img, mut expect) = raw_image(t.path(), "pt.img", 4 << 20, 14);
    let m = Mount::new(
        &[&img],
        &t.path().join("mnt"),
        &["--passthrough", "--format", "raw"],
    );
    let f = m.file("pt.raw");
    assert_same(&std::fs::read(&f).unwrap(), &expect, "passthrough read");
    let data = random_bytes(15, 100_000);
    pwrite(&f, 12345, &data).unwrap();
    expect[12345..12345 + data.len()].copy_from_slice(&data);
    assert_same(
        &std::fs::read(&f).unwrap(),
        &expect,
        "passthrough read after write",
    );
    // The daemon never saw the I/O: the kernel did it on the image file.
    let read = ok(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.imgfs.bytes_read",
            f.to_str().unwrap(),
        ],
    );
    assert_eq!(read, "0");
    assert!(m.umount().0);
    assert_eq!(std::fs::read(&img).unwrap(), expect);
    // A probed raw image is not passed through: the first-sector guard still applies.
    let m = Mount::new(&[&img], &t.path().join("mnt"), &["--passthrough"]);
    let e = pwrite(&m.file("pt.raw"), 0, b"QFI\xfb\0\0\0\x03").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
}

#[test]
fn directory_of_qcow2_chain_exposes_only_the_top() {
    let t = tmpdir();
    let d = t.path().join("vms");
    std::fs::create_dir(&d).unwrap();
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    let other = d.join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
    qemu_io("qcow2", &base, &["write -P 0x61 0 1M"]);
    qcow2_overlay(&top, "base.qcow2");
    qemu_io("qcow2", &top, &["write -P 0x62 512k 4k"]);
    qemu_img(&["create", "-q", "-f", "qcow2", other.to_str().unwrap(), "4M"]);
    let want = qemu_raw(&top);
    let base_before = std::fs::read(&base).unwrap();
    let m = Mount::new(&[&d], &t.path().join("mnt"), &[]);
    let mut names: Vec<String> = std::fs::read_dir(&m.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["other.raw", "top.raw"]);
    assert_same(
        &std::fs::read(m.file("top.raw")).unwrap(),
        &want,
        "top through chain",
    );
    pwrite(&m.file("top.raw"), 100, b"written to the top only").unwrap();
    assert!(m.umount().0);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "backing file untouched"
    );
    assert_check_clean("qcow2", &top);
}

#[test]
fn small_discards_over_unallocated_space_allocate_nothing() {
    let t = tmpdir();
    for (fmt, opts) in [
        ("vhdx", "block_size=32M"),
        ("qcow2", "cluster_size=2M"),
        ("qed", "cluster_size=1M"),
    ] {
        let img = t.path().join(format!("d.{fmt}"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            "-o",
            opts,
            img.to_str().unwrap(),
            "256M",
        ]);
        let before = std::fs::metadata(&img).unwrap().len();
        let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
        let f = m.file("d.raw");
        ok(
            "fallocate",
            &[
                "--punch-hole",
                "-o",
                "4096",
                "-l",
                "8192",
                f.to_str().unwrap(),
            ],
        );
        ok(
            "fallocate",
            &[
                "--zero-range",
                "-o",
                "100000000",
                "-l",
                "4096",
                f.to_str().unwrap(),
            ],
        );
        assert!(m.umount().0);
        if fmt == "vhdx" {
            // QEMU's VHDX driver reports every block as data in `qemu-img map`: use the file size
            // (a 32 MiB block would show).
            let after = std::fs::metadata(&img).unwrap().len();
            assert!(
                after < before + (1 << 20),
                "vhdx: grew from {before} to {after}"
            );
            assert_eq!(qemu_raw(&img), vec![0u8; 256 << 20]);
            continue;
        }
        let map: serde_json::Value =
            serde_json::from_str(&qemu_img(&["map", "--output=json", img.to_str().unwrap()]))
                .unwrap();
        let allocated: Vec<_> = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .collect();
        assert!(
            allocated.is_empty(),
            "{fmt}: a small discard allocated data: {allocated:?}"
        );
        assert_eq!(qemu_raw(&img), vec![0u8; 256 << 20], "{fmt}");
    }
}
