//! Partitions as files: `<stem>.partitions/N.raw` for MBR (with logical partitions) and GPT disks,
//! on raw, qcow2 and VHDX images; ext4 made and used through a partition file (loop device as root,
//! fuse2fs as an unprivileged user); page-cache coherence between the disk and partition files;
//! repartitioning while mounted.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

/// Primary 1 (10 MiB at 1 MiB), extended 2, logicals 5 (10 MiB at 12 MiB) and 6 (10 MiB at 23 MiB).
const MBR_SCRIPT: &str = "label: dos\n\
start=2048, size=20480, type=83\n\
start=22528, size=100000, type=5\n\
start=24576, size=20480, type=83\n\
start=47104, size=20480, type=82\n";

/// GPT: "boot" 8 MiB at 1 MiB, "root" 40 MiB at 9 MiB.
const GPT_SCRIPT: &str = "label: gpt\n\
start=2048, size=16384, name=boot, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
start=18432, size=81920, name=root, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";

fn sfdisk(disk: &Path, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", "--wipe", "always"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn_child()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (name, size) of every entry of a partition directory, sorted by name.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

fn create(dir: &Path, fmt: &str) -> PathBuf {
    let p = dir.join(format!("disk.{fmt}"));
    qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), "64M"]);
    p
}

/// A fresh 64 MiB `fmt` image, mounted (with `extra` options) and given GPT_SCRIPT through the
/// disk file. Drop order of the returned tuple: mount, then the directory.
fn gpt_mount(fmt: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Mount) {
    let t = tmpdir();
    let img = create(t.path(), fmt);
    let m = Mount::new(&[&img], &t.path().join("mnt"), extra);
    sfdisk(&m.file("disk.raw"), GPT_SCRIPT);
    (t, img, m)
}

fn xattr(p: &Path, name: &str) -> String {
    ok(
        "getfattr",
        &["--only-values", "-n", name, p.to_str().unwrap()],
    )
}

#[test]
fn mbr_with_logical_partitions_on_raw_qcow2_vhdx() {
    for fmt in ["raw", "qcow2", "vhdx"] {
        let t = tmpdir();
        let img = create(t.path(), fmt);
        let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
        let disk = m.file("disk.raw");
        assert!(!m.file("disk.partitions").exists(), "{fmt}: no table yet");
        sfdisk(&disk, MBR_SCRIPT);
        let parts = m.file("disk.partitions");
        assert_eq!(
            listing(&parts),
            [
                ("1.raw".into(), 10 * MIB),
                ("2.raw".into(), 1024),
                ("5.raw".into(), 10 * MIB),
                ("6.raw".into(), 10 * MIB)
            ],
            "{fmt}"
        );
        assert_eq!(
            xattr(&parts.join("6.raw"), "user.imgfs.partition.type"),
            "82"
        );
        // Writes through a partition land at its offset on the disk, and the other way round.
        let data = random_bytes(5, 300_000);
        pwrite(&parts.join("5.raw"), 4097, &data).unwrap();
        assert_same(&pread(&disk, 12 * MIB + 4097, data.len()), &data, fmt);
        pwrite(&disk, 23 * MIB + 10, &data[..1000]).unwrap();
        assert_same(&pread(&parts.join("6.raw"), 10, 1000), &data[..1000], fmt);
        // Nothing crosses a partition's end: a write running past it is cut short there.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(parts.join("1.raw"))
            .unwrap();
        assert_eq!(f.write_at(&[0xEE; 8192], 10 * MIB - 4096).unwrap(), 4096);
        let err = f.write_at(&[1], 10 * MIB).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{fmt}");
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(
            pread(&disk, 11 * MIB, 1),
            [0],
            "{fmt}: byte after partition 1"
        );
        let mut want = std::fs::read(&disk).unwrap();
        let (ok, err) = m.umount();
        assert!(ok, "{err}");
        if fmt != "raw" {
            assert_check_clean(fmt, &img);
        }
        want[11 * MIB as usize - 4096..11 * MIB as usize].fill(0xEE);
        assert_compare_bytes(fmt, &img, &want);
    }
}

#[test]
fn gpt_ext4_through_a_partition_file_and_a_loop_device() {
    let (t, img, m) = gpt_mount("qcow2", &[]);
    let disk = m.file("disk.raw");
    let root = m.file("disk.partitions/2.raw");
    assert_eq!(std::fs::metadata(&root).unwrap().len(), 40 * MIB);
    assert_eq!(xattr(&root, "user.imgfs.partition.name"), "root");
    assert_eq!(
        xattr(&root, "user.imgfs.partition.type"),
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    );
    ok("mkfs.ext4", &["-q", "-F", root.to_str().unwrap()]);
    {
        let lo = Loop::new(&root, &[]);
        let km = KernelMount::new(&lo.dev, &t.path().join("ext4"));
        std::fs::write(km.dir.join("hello.txt"), b"through a partition file\n").unwrap();
        std::fs::write(km.dir.join("big.bin"), random_bytes(9, 3 << 20)).unwrap();
        ok("sync", &[]);
    }
    ok("e2fsck", &["-fn", root.to_str().unwrap()]);
    // The partition file is the disk's bytes at the partition's offset.
    let part = std::fs::read(&root).unwrap();
    assert_same(
        &pread(&disk, 9 * MIB, part.len()),
        &part,
        "partition 2 vs disk",
    );
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    assert_check_clean("qcow2", &img);
    // imgfs info names the partitions.
    let info = ok(IMGFS, &["info", "--json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["partitions"]["scheme"], "gpt");
    assert_eq!(v["partitions"]["partitions"][0]["name"], "boot");
    assert_eq!(
        v["partitions"]["partitions"][1]["start"].as_u64(),
        Some(9 * MIB)
    );
    let raw = qemu_raw(&img);
    let remount = Mount::new(&[&img], &t.path().join("mnt"), &["--read-only"]);
    let again = std::fs::read(remount.file("disk.partitions/2.raw")).unwrap();
    assert_same(&again, &raw[9 * MIB as usize..49 * MIB as usize], "remount");
    // Read-only mounts: the partition files are read-only too.
    let err = pwrite(&remount.file("disk.partitions/1.raw"), 0, b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}

fn ensure_test_user() {
    let out = run("useradd", &["-M", "-s", "/bin/sh", "imgfs-test"]);
    // 9: the user exists already (created by another test or run).
    assert!(
        out.status.success() || out.status.code() == Some(9),
        "useradd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok("chmod", &["0666", "/dev/fuse"]);
}

#[test]
fn fuse2fs_as_an_unprivileged_user() {
    ensure_test_user();
    // Root mounts for everybody and gives the files to the user (--uid): the user then opens the
    // partition's filesystem with fuse2fs and writes to it, with no privileges.
    let (t, _img, m) = gpt_mount("qcow2", &["--allow-other", "--uid", "imgfs-test"]);
    ok("chmod", &["0755", t.path().to_str().unwrap()]);
    let root = m.file("disk.partitions/2.raw");
    ok("mkfs.ext4", &["-q", "-F", root.to_str().unwrap()]);
    {
        let lo = Loop::new(&root, &[]);
        let km = KernelMount::new(&lo.dev, &t.path().join("ext4"));
        std::fs::write(km.dir.join("from-root.txt"), b"written as root\n").unwrap();
    }
    let fsdir = t.path().join("user-ext4");
    std::fs::create_dir(&fsdir).unwrap();
    ok("chown", &["imgfs-test", fsdir.to_str().unwrap()]);
    // fuse2fs runs in the foreground so that `wait` returns only once it has written everything
    // back and exited; the loop waits (bounded) for its mount to appear.
    let script = format!(
        "fuse2fs -f -o fakeroot {root} {dir} >&2 & pid=$!; i=0; \
         until mountpoint -q {dir}; do i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done; \
         echo 'written by fuse2fs' > {dir}/from-user.txt && cat {dir}/from-root.txt; r=$?; \
         fusermount3 -u {dir}; wait $pid; exit $r",
        root = root.display(),
        dir = fsdir.display()
    );
    let out = ok("runuser", &["-u", "imgfs-test", "--", "sh", "-c", &script]);
    assert_eq!(out, "written as root\n");
    ok("e2fsck", &["-fn", root.to_str().unwrap()]);
    let got = ok(
        "debugfs",
        &["-R", "cat /from-user.txt", root.to_str().unwrap()],
    );
    assert_eq!(got, "written by fuse2fs\n");
}

#[test]
fn page_cache_coherence_between_disk_and_partition() {
    let (_t, _img, m) = gpt_mount("raw", &[]);
    let disk = m.file("disk.raw");
    let part = m.file("disk.partitions/1.raw");
    let base = MIB;
    let rw = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    };
    let (d, p) = (rw(&disk), rw(&part));
    // Fill both page caches, then write through each file in turn.
    let mut buf = vec![0u8; 8192];
    d.read_exact_at(&mut buf, base).unwrap();
    p.read_exact_at(&mut buf, 0).unwrap();
    let map = Mmap::new(&p, 8192);
    assert_eq!(map.bytes()[4096..4100], [0, 0, 0, 0]);
    p.write_all_at(b"part", 4096).unwrap();
    d.read_exact_at(&mut buf[..4], base + 4096).unwrap();
    assert_eq!(
        &buf[..4],
        b"part",
        "buffered disk reader after a partition write"
    );
    d.write_all_at(b"disk", base + 4096).unwrap();
    p.read_exact_at(&mut buf[..4], 4096).unwrap();
    assert_eq!(
        &buf[..4],
        b"disk",
        "buffered partition reader after a disk write"
    );
    assert_eq!(
        &map.bytes()[4096..4100],
        b"disk",
        "mmap reader of the partition"
    );
    // O_DIRECT writers and readers.
    let dd = open_direct(&disk, true);
    direct_write(&dd, base + 4096, &[7u8; 4096]);
    p.read_exact_at(&mut buf[..4096], 4096).unwrap();
    assert_eq!(
        buf[..4096],
        [7u8; 4096],
        "buffered partition reader after O_DIRECT disk write"
    );
    assert_eq!(
        map.bytes()[4096..8192],
        [7u8; 4096],
        "mmap after O_DIRECT disk write"
    );
    let pd = open_direct(&part, true);
    direct_write(&pd, 0, &[9u8; 4096]);
    d.read_exact_at(&mut buf[..4096], base).unwrap();
    assert_eq!(
        buf[..4096],
        [9u8; 4096],
        "buffered disk reader after O_DIRECT partition write"
    );
    assert_eq!(direct_read(&dd, base, 4096), [9u8; 4096]);
    let dmap = Mmap::new(&d, 2 * MIB as usize);
    pwrite(&part, 100, b"mmap").unwrap();
    assert_eq!(
        &dmap.bytes()[MIB as usize + 100..MIB as usize + 104],
        b"mmap"
    );
}

/// A shared read-only mapping, unmapped on drop.
struct Mmap {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mmap {
    fn new(f: &std::fs::File, len: usize) -> Mmap {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of an open file; only read through `bytes`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Mmap { ptr, len }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping lives as long as self; volatile contents are fine for a test.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in new.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[test]
fn repartitioning_changes_the_directory_without_remounting() {
    let t = tmpdir();
    let img = create(t.path(), "qcow2");
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let disk = m.file("disk.raw");
    sfdisk(&disk, MBR_SCRIPT);
    let parts = m.file("disk.partitions");
    let old5 = std::fs::File::open(parts.join("5.raw")).unwrap();
    let old1 = std::fs::File::open(parts.join("1.raw")).unwrap();
    let mut b = [0u8; 16];
    old5.read_exact_at(&mut b, 0).unwrap();
    sfdisk(&disk, GPT_SCRIPT);
    assert_eq!(
        listing(&parts),
        [("1.raw".into(), 8 * MIB), ("2.raw".into(), 40 * MIB)]
    );
    // The open logical partition vanished: its file fails instead of reading other bytes.
    let err = old5.read_exact_at(&mut b, 0).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::ENXIO) | Some(libc::EIO)),
        "{err}"
    );
    // Partition 1 moved (10 MiB -> 8 MiB): the old handle fails too, a new open sees the new one.
    assert!(old1.read_exact_at(&mut b, 0).is_err());
    assert_eq!(
        std::fs::metadata(parts.join("1.raw")).unwrap().len(),
        8 * MIB
    );
    // A corrupt primary GPT: the backup one serves.
    pwrite(&disk, 512, b"NOT PART").unwrap();
    assert_eq!(
        listing(&parts),
        [("1.raw".into(), 8 * MIB), ("2.raw".into(), 40 * MIB)]
    );
    assert_eq!(
        xattr(&parts.join("2.raw"), "user.imgfs.partition.name"),
        "root"
    );
    // Wiping the table removes the directory.
    ok("wipefs", &["-q", "-a", "-f", disk.to_str().unwrap()]);
    assert!(!parts.exists());
    assert!(!std::fs::read_dir(&m.dir)
        .unwrap()
        .any(|e| e.unwrap().file_name() == "disk.partitions"));
}

#[test]
fn no_partitions_option_and_snapshot_views() {
    let t = tmpdir();
    let raw = t.path().join("src.img");
    ok("truncate", &["-s", "64M", raw.to_str().unwrap()]);
    sfdisk(&raw, GPT_SCRIPT);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(b"in the snapshot", 9 * MIB)
        .unwrap();
    let img = t.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    qemu_img(&["snapshot", "-c", "s1", img.to_str().unwrap()]);
    qemu_io("qcow2", &img, &["write -P 1 9M 4096"]);
    {
        let m = Mount::new(&[&img], &t.path().join("mnt"), &["--no-partitions"]);
        assert!(m.file("disk.raw").exists());
        assert!(!m.file("disk.partitions").exists());
        assert!(!m.file("disk.snapshots/s1.partitions").exists());
    }
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let snap = m.file("disk.snapshots/s1.partitions/2.raw");
    assert_eq!(pread(&snap, 0, 15), b"in the snapshot");
    assert_eq!(pread(&m.file("disk.partitions/2.raw"), 0, 4), [1, 1, 1, 1]);
    assert!(
        pwrite(&snap, 0, b"x").is_err(),
        "snapshot partitions are read-only"
    );
}
