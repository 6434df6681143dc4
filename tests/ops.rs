//! Operations: mount(8) helper and fstab, plain umount, the stats command, the systemd unit.

mod common;
use common::*;
use std::path::Path;

fn mount_type(dir: &Path) -> Option<(String, String, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let d = dir.display().to_string();
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(1) == Some(&d.as_str()))
            .then(|| (f[0].to_string(), f[2].to_string(), f[3].to_string()))
    })
}

#[test]
fn mount_t_fuse_imgfs_and_fstab_then_plain_umount() {
    let _h = MountHelper::install();
    let t = tmpdir();
    let data = random_bytes(1, 1 << 20);
    let img = write_file(t.path(), "disk.img", &data);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(
        "mount",
        &[
            "-t",
            "fuse.imgfs",
            img.to_str().unwrap(),
            mnt.to_str().unwrap(),
            "-o",
            "ro,allow_other,noauto",
        ],
    );
    let (source, fstype, opts) = mount_type(&mnt).expect("mounted");
    assert_eq!(fstype, "fuse.imgfs");
    assert_eq!(source, img.to_str().unwrap());
    assert!(opts.split(',').any(|o| o == "ro"), "{opts}");
    assert!(opts.contains("allow_other"), "{opts}");
    assert_eq!(std::fs::read(mnt.join("disk.raw")).unwrap(), data);
    let pid: i32 = ok(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.imgfs.pid",
            mnt.to_str().unwrap(),
        ],
    )
    .trim()
    .parse()
    .unwrap();
    ok("umount", &[mnt.to_str().unwrap()]);
    assert!(
        wait_until(10, || !process_alive(pid)),
        "daemon exits after umount"
    );

    // The same through an fstab line.
    let fstab = t.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{} {} fuse.imgfs rw,noauto,x-systemd.automount 0 0\n",
            img.display(),
            mnt.display()
        ),
    )
    .unwrap();
    ok(
        "mount",
        &["--fstab", fstab.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    assert_eq!(mount_type(&mnt).unwrap().1, "fuse.imgfs");
    pwrite(&mnt.join("disk.raw"), 10, b"fstab").unwrap();
    ok("umount", &[mnt.to_str().unwrap()]);
    assert!(wait_until(10, || !is_mounted(&mnt)));
    // umount(8) returns before the daemon finished; imgfs umount is the waiting variant.
    assert!(wait_until(10, || std::fs::read(&img).unwrap()[10..15] == *b"fstab"));
}

#[test]
fn stats_command_counts_a_known_workload() {
    let t = tmpdir();
    let img = write_file(t.path(), "s.img", &vec![0u8; 4 << 20]);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("s.raw");
    {
        let fh = open_direct(&f, true);
        for i in 0..10u64 {
            direct_write(&fh, i * 65536, &[7u8; 65536]);
        }
        for i in 0..4u64 {
            direct_read(&fh, i * 65536, 65536);
        }
        fh.sync_all().unwrap();
    }
    let out = ok(IMGFS, &["stats", "--json", m.dir.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s = &v[0];
    assert_eq!(s["name"], "s.raw");
    assert_eq!(s["writes"], 10, "{s}");
    assert_eq!(s["bytes_written"], 10 * 65536);
    assert_eq!(s["bytes_read"], 4 * 65536);
    assert!(s["flushes"].as_u64().unwrap() >= 1);
    let text = ok(IMGFS, &["stats", m.dir.to_str().unwrap()]);
    assert!(
        text.contains("s.raw (raw, read-write)") && text.contains("bytes_written"),
        "{text}"
    );
}

#[test]
fn systemd_unit_verifies() {
    if run("which", &["systemd-analyze"]).status.code() != Some(0) {
        eprintln!("systemd-analyze not installed; skipped");
        return;
    }
    let t = tmpdir();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/imgfs@.service"
    ))
    .unwrap();
    // Point ExecStart at the binary under test (the unit names the installed path).
    let unit = unit.replace("/usr/local/bin/imgfs", IMGFS);
    let p = t.path().join("imgfs@test.service");
    std::fs::write(&p, unit).unwrap();
    let out = run("systemd-analyze", &["verify", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = err.lines().filter(|l| l.contains("imgfs@")).collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[test]
fn sd_notify_ready_only_once_the_mount_works() {
    use std::os::unix::net::UnixDatagram;
    let t = tmpdir();
    let data = random_bytes(3, 1 << 20);
    let img = write_file(t.path(), "n.img", &data);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = MountGuard(mnt.clone());
    let sock_path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut child = std::process::Command::new(IMGFS)
        .args(["mount", "-f", img.to_str().unwrap(), mnt.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn_child()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        msg.contains("READY=1") && msg.contains(&format!("MAINPID={}", child.id())),
        "{msg}"
    );
    // At READY the file is already there and readable.
    assert_eq!(std::fs::read(mnt.join("n.raw")).unwrap(), data);
    ok("kill", &["-TERM", &child.id().to_string()]);
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
}

/// O_DIRECT openers get the kernel's direct-I/O path (FOPEN_DIRECT_IO): their writes, split
/// into several parallel requests, must still be seen by a buffered reader that cached the
/// range before, and such a file may still be mapped shared.
#[test]
fn direct_io_opens_stay_coherent_with_buffered_readers_and_mmap() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let t = tmpdir();
    let img = t.path().join("d.qcow2");
    TestImage::build_at(&img, "qcow2").size("16M").qemu();
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("d.raw");
    let buffered = std::fs::File::open(&f).unwrap();
    let mut cached = vec![1u8; 4 << 20];
    buffered.read_exact_at(&mut cached, 0).unwrap();
    assert!(cached.iter().all(|&b| b == 0));

    let direct = open_direct(&f, true);
    let data = random_bytes(7, (1 << 20) + (128 << 10));
    // 1 MiB + 128 KiB at 64 KiB: more than one request's worth, unaligned to clusters.
    direct_write(&direct, 64 << 10, &data);
    let mut want = vec![0u8; 4 << 20];
    want[64 << 10..(64 << 10) + data.len()].copy_from_slice(&data);
    buffered.read_exact_at(&mut cached, 0).unwrap();
    assert_same(&cached, &want, "buffered read after O_DIRECT write");

    // SAFETY: a fresh shared mapping of 8 KiB of an open file, unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            direct.as_raw_fd(),
            3 << 20,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    // SAFETY: `map` is a live 8 KiB mapping.
    unsafe {
        std::ptr::write_bytes(map as *mut u8, 0xab, 8192);
        assert_eq!(libc::msync(map, 8192, libc::MS_SYNC), 0);
        libc::munmap(map, 8192);
    }
    want[3 << 20..(3 << 20) + 8192].fill(0xab);
    let back = direct_read(&direct, 0, 4 << 20);
    assert_same(&back, &want, "O_DIRECT read after mmap write");
    buffered.read_exact_at(&mut cached, 0).unwrap();
    assert_same(&cached, &want, "buffered read after mmap write");
    drop((buffered, direct));
    m.umount_ok();
    assert_check_clean("qcow2", &img);
    want.resize(16 << 20, 0);
    assert_same(&qemu_raw(&img), &want, "qemu-img convert after umount");
}

/// Large reads are spliced from the image files (data of the image and its backing file, zero
/// runs) or, where that cannot work (compressed clusters, data past the end of the file),
/// copied: every mix must read exactly what QEMU reads, through O_DIRECT and buffered opens.
#[test]
fn large_reads_mixing_data_zeros_backing_and_compressed_match_qemu() {
    let t = tmpdir();
    let base = t.path().join("base.qcow2");
    let img = t.path().join("top.qcow2");
    TestImage::build_at(&base, "qcow2")
        .size("8M")
        .qemu()
        .io(&["write -P 0x11 0 8M"]);
    TestImage::build_at(&img, "qcow2")
        .backing(base.to_str().unwrap(), Some("qcow2"))
        .size("8M")
        .qemu()
        .io(&[
            "write -P 0x22 64k 192k",
            "write -z 512k 128k",
            "write -P 0x33 1M 1M",
            "write -c -P 0x44 3M 64k",
            "write -P 0x55 4M 4M",
            "write -z 5M 320k",
        ]);
    let want = qemu_raw(&img);
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let f = m.file("top.raw");
    let direct = open_direct(&f, false);
    for chunk in [1usize << 20, 256 << 10, 68 << 10] {
        let mut got = Vec::with_capacity(want.len());
        let mut off = 0;
        while off < want.len() {
            let n = chunk.min(want.len() - off);
            got.extend_from_slice(&direct_read(&direct, off as u64, n));
            off += n;
        }
        assert_same(&got, &want, &format!("O_DIRECT reads of {chunk} bytes"));
    }
    assert_same(&std::fs::read(&f).unwrap(), &want, "buffered read");
    drop(direct);
    m.umount_ok();
}

/// Workers poll for the next request only briefly (`--poll-us`): an idle daemon, right after a
/// burst of requests, uses no CPU. `--poll-us 0` (never poll) serves I/O the same way, and an
/// out-of-range value is refused with a clear message.
#[test]
fn polling_workers_go_idle_and_poll_us_is_checked() {
    let t = tmpdir();
    let data = random_bytes(7, 4 << 20);
    let img = write_file(t.path(), "disk.img", &data);
    let mut want = data;
    for (round, poll) in ["30", "0", "1000"].into_iter().enumerate() {
        let m = Mount::new(&[&img], &t.path().join("mnt"), &["--poll-us", poll]);
        let f = m.file("disk.raw");
        let direct = open_direct(&f, true);
        for i in 0..256usize {
            let block = random_bytes((round * 1000 + i) as u64, 4096);
            let off = i * (16 << 10);
            want[off..off + 4096].copy_from_slice(&block);
            direct_write(&direct, off as u64, &block);
            assert_same(&direct_read(&direct, off as u64, 4096), &block, "read back");
        }
        let pid = m.pid();
        let before = cpu_ticks(pid);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let used = cpu_ticks(pid) - before;
        // One tick is 10 ms: a worker still polling would use about 100 in this second.
        assert!(
            used <= 5,
            "--poll-us {poll}: idle daemon used {used} ticks in 1 s"
        );
        drop(direct);
        assert_same(&std::fs::read(&f).unwrap(), &want, "contents");
        m.umount_ok();
    }
    assert_same(&std::fs::read(&img).unwrap(), &want, "image file");
    let err = Mount::try_new(&[&img], &t.path().join("mnt"), &["--poll-us", "5000"])
        .err()
        .expect("--poll-us 5000 must be refused");
    assert!(err.contains("--poll-us must be at most 1000"), "{err}");
}
