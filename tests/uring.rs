//! The FUSE-over-io_uring transport end to end (`imgfs mount --transport uring`): reads, writes,
//! fsync, discard, umount, SIGTERM and kill -9 on qcow2 and raw images, many requests in flight
//! at once, and the transport shown by `imgfs stats`. The whole suite also runs once per
//! transport (`scripts/test.sh`, IMGFS_TRANSPORT); these tests pin `--transport` themselves.
//! Where the kernel lacks the feature they say so and skip; as root they turn its switch on.

mod common;
use common::*;
use std::path::{Path, PathBuf};

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// True when FUSE-over-io_uring can be used (switched on here when root); else prints why not.
fn uring_ready(test: &str) -> bool {
    if !Path::new(PARAM).exists() {
        eprintln!("SKIP {test}: this kernel has no FUSE-over-io_uring ({PARAM} missing)");
        return false;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::fs::write(PARAM, "Y").expect("enable FUSE-over-io_uring");
    }
    let on = std::fs::read_to_string(PARAM).unwrap_or_default();
    if on.trim() != "Y" {
        eprintln!("SKIP {test}: FUSE-over-io_uring is off ({PARAM} is {on}) and we are not root");
        return false;
    }
    true
}

fn transport_of(mnt: &Path) -> String {
    let out = ok(IMGFS, &["stats", "--json", mnt.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["transport"].as_str().unwrap_or("").to_string()
}

/// An image of `fmt` with some data written by QEMU; returns it and the bytes QEMU sees.
fn image(dir: &Path, fmt: &str) -> (PathBuf, Vec<u8>) {
    let img = dir.join(format!("disk.{}", if fmt == "raw" { "img" } else { fmt }));
    qemu_img(&["create", "-f", fmt, img.to_str().unwrap(), "32M"]);
    qemu_io(
        fmt,
        &img,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 3M 300k",
            "write -P 0x11 31M 1M",
        ],
    );
    let want = qemu_raw(&img);
    (img, want)
}

/// dd `data` into `file` at `off` (O_DIRECT when `direct`), then fsync: run as a child so this
/// process holds no descriptor in the mount.
fn dd_write(dir: &Path, file: &Path, off: u64, data: &[u8], direct: bool) {
    let src = write_file(dir, "dd.src", data);
    let mut args = [
        format!("if={}", src.display()),
        format!("of={}", file.display()),
        format!("bs={}", data.len()),
        "count=1".into(),
        format!("seek={off}"),
        "oflag=seek_bytes".into(),
        "conv=notrunc,fsync".into(),
        "status=none".into(),
    ];
    if direct {
        args[5] = "oflag=seek_bytes,direct".into();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok("dd", &args);
}

/// A fresh `image` of `fmt` mounted with `--transport uring`: (its directory, the image, QEMU's
/// bytes, the mountpoint, the mount).
fn mounted(fmt: &str) -> (tempfile::TempDir, PathBuf, Vec<u8>, PathBuf, Mount) {
    let t = tmpdir();
    let (img, want) = image(t.path(), fmt);
    let mnt = t.path().join("mnt");
    let m = Mount::new(&[&img], &mnt, &["--transport", "uring", "-F", fmt]);
    (t, img, want, mnt, m)
}

/// The image holds exactly `want` (QEMU's view) and, when it has metadata, passes qemu-img check.
fn verify(fmt: &str, img: &Path, want: &[u8]) {
    assert_compare_bytes(fmt, img, want);
    if fmt != "raw" {
        assert_check_clean(fmt, img);
    }
}

fn umount_and_verify(m: Mount, fmt: &str, img: &Path, want: &[u8]) {
    let (umounted, err) = m.umount();
    assert!(umounted, "{fmt}: umount: {err}");
    verify(fmt, img, want);
}

#[test]
fn uring_read_write_fsync_discard_umount_qcow2_and_raw() {
    if !uring_ready("uring_read_write_fsync_discard_umount_qcow2_and_raw") {
        return;
    }
    for fmt in ["qcow2", "raw"] {
        let (t, img, mut want, mnt, m) = mounted(fmt);
        assert_eq!(transport_of(&mnt), "io_uring", "{fmt}");
        let f = m.file("disk.raw");
        // Whole-file buffered read (read-ahead: many 256 KiB requests) and direct reads.
        assert_same(
            &std::fs::read(&f).unwrap(),
            &want,
            &format!("{fmt}: first read"),
        );
        let d = open_direct(&f, false);
        assert_same(
            &direct_read(&d, 3 << 20, 1 << 20),
            &want[3 << 20..4 << 20],
            &format!("{fmt}: direct read"),
        );
        drop(d);
        // Writes: 1 MiB direct (split into parallel requests), unaligned buffered, small.
        let big = random_bytes(1, 1 << 20);
        dd_write(t.path(), &f, 8 << 20, &big, true);
        want[8 << 20..9 << 20].copy_from_slice(&big);
        let odd = random_bytes(2, 70_001);
        dd_write(t.path(), &f, (3 << 20) + 4095, &odd, false);
        want[(3 << 20) + 4095..(3 << 20) + 4095 + 70_001].copy_from_slice(&odd);
        let small = random_bytes(3, 512);
        dd_write(t.path(), &f, 31 << 20, &small, true);
        want[31 << 20..(31 << 20) + 512].copy_from_slice(&small);
        // Discard and zero-range.
        let fs = f.to_str().unwrap();
        ok(
            "fallocate",
            &["--punch-hole", "-o", "65536", "-l", "131072", fs],
        );
        want[65536..65536 + 131072].fill(0);
        ok(
            "fallocate",
            &["--zero-range", "-o", "8392704", "-l", "4096", fs],
        );
        want[8392704..8392704 + 4096].fill(0);
        assert_same(
            &std::fs::read(&f).unwrap(),
            &want,
            &format!("{fmt}: reread"),
        );
        umount_and_verify(m, fmt, &img, &want);
    }
}

#[test]
fn uring_many_requests_in_flight_keep_their_data() {
    if !uring_ready("uring_many_requests_in_flight_keep_their_data") {
        return;
    }
    let t = tmpdir();
    let img = t.path().join("par.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "64M"]);
    let mnt = t.path().join("mnt");
    let m = Mount::new(&[&img], &mnt, &["--transport", "uring", "--threads", "3"]);
    let f = m.file("par.raw");
    // 4 writers on disjoint 16 MiB stripes with 4 KiB..256 KiB direct writes, each reading back
    // what it wrote; then the whole file is compared.
    let mut want = vec![0u8; 64 << 20];
    let stripes: Vec<(u64, Vec<u8>)> = (0..4u64)
        .map(|s| (s * (16 << 20), random_bytes(100 + s, 16 << 20)))
        .collect();
    std::thread::scope(|sc| {
        for (base, data) in &stripes {
            let f = &f;
            sc.spawn(move || {
                let fh = open_direct(f, true);
                let mut off = 0usize;
                let mut n = 0usize;
                while off < data.len() {
                    let len = (4096usize << (n % 7)).min(data.len() - off);
                    direct_write(&fh, base + off as u64, &data[off..off + len]);
                    assert_same(
                        &direct_read(&fh, base + off as u64, len),
                        &data[off..off + len],
                        "read back in flight",
                    );
                    off += len;
                    n += 1;
                }
                fh.sync_all().unwrap();
            });
        }
    });
    for (base, data) in &stripes {
        want[*base as usize..*base as usize + data.len()].copy_from_slice(data);
    }
    assert_same(&std::fs::read(&f).unwrap(), &want, "after parallel writes");
    umount_and_verify(m, "qcow2", &img, &want);
}

#[test]
fn uring_sigterm_flushes_and_exits() {
    if !uring_ready("uring_sigterm_flushes_and_exits") {
        return;
    }
    for fmt in ["qcow2", "raw"] {
        let (t, img, mut want, mnt, m) = mounted(fmt);
        let pid = m.pid();
        let data = random_bytes(9, 200_000);
        dd_write(t.path(), &m.file("disk.raw"), 5_000_000, &data, false);
        want[5_000_000..5_200_000].copy_from_slice(&data);
        ok("kill", &["-TERM", &pid.to_string()]);
        assert!(
            wait_until(10, || !process_alive(pid)),
            "{fmt}: daemon still running after SIGTERM"
        );
        assert!(!is_mounted(&mnt), "{fmt}: still mounted after SIGTERM");
        std::mem::forget(m);
        verify(fmt, &img, &want);
    }
}

#[test]
fn uring_kill9_keeps_fsynced_data_and_remounts() {
    if !uring_ready("uring_kill9_keeps_fsynced_data_and_remounts") {
        return;
    }
    for fmt in ["qcow2", "raw"] {
        let (t, img, mut want, mnt, m) = mounted(fmt);
        let _guard = MountGuard(mnt.clone());
        let pid = m.pid();
        let data = random_bytes(11, 1 << 20);
        dd_write(t.path(), &m.file("disk.raw"), 12 << 20, &data, true);
        want[12 << 20..13 << 20].copy_from_slice(&data);
        ok("kill", &["-KILL", &pid.to_string()]);
        assert!(wait_until(10, || !process_alive(pid)), "{fmt}: kill -9");
        // `imgfs umount` recognises the dead daemon and removes the stale mount; a new mount
        // serves the fsync'd data.
        let (cleared, msg) = m.umount();
        assert!(
            cleared && msg.contains("stale"),
            "{fmt}: umount after kill -9: {msg}"
        );
        let m = Mount::new(&[&img], &mnt, &["--transport", "uring", "-F", fmt]);
        assert_same(
            &pread(&m.file("disk.raw"), 12 << 20, 1 << 20),
            &data,
            &format!("{fmt}: fsync'd data after kill -9"),
        );
        umount_and_verify(m, fmt, &img, &want);
    }
}

#[test]
fn dev_transport_is_reported_and_unknown_ones_refused() {
    let t = tmpdir();
    let (img, want) = image(t.path(), "qcow2");
    let mnt = t.path().join("mnt");
    let m = Mount::new(&[&img], &mnt, &["--transport", "dev"]);
    assert_eq!(transport_of(&mnt), "dev");
    assert_same(
        &std::fs::read(m.file("disk.raw")).unwrap(),
        &want,
        "dev read",
    );
    assert!(m.umount().0);
    let err = Mount::try_new(&[&img], &mnt, &["--transport", "carrier-pigeon"])
        .err()
        .expect("unknown transport refused");
    assert!(err.contains("carrier-pigeon"), "{err}");
    assert!(!is_mounted(&mnt));
}
