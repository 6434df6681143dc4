//! VHDX logs left dirty: an imgfs writer cut off after its log entry is durable but before the
//! in-place BAT update, once with a single entry and once after so many flushes that the
//! circular log wrapped. imgfs must replay them (in memory when read-only, into the file when
//! read-write) to the same content `qemu-img check -r all` produces.

mod common;

use common::*;
use imgfs::host::FaultFile;
use imgfs::{Image, OpenOpts};
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Open `img` read-write on a fault-injecting copy, let `work` write and flush, then cut the
/// power without closing: the durable bytes of a writer stopped after its last flush.
fn durable_after(img: &Path, work: impl FnOnce(&Image, &FaultFile)) -> Vec<u8> {
    let fault = FaultFile::new(std::fs::read(img).unwrap());
    let opts = OpenOpts {
        format: Some("vhdx".into()),
        lock: false,
        ..OpenOpts::default()
    };
    let im = Image::open_host(fault.host_file(img, true), &opts).unwrap();
    work(&im, fault.as_ref());
    let dirty = fault.durable();
    std::mem::forget(im);
    dirty
}

/// `dirty` = durable bytes of a cut-off writer; `want` = the guest content that was flushed.
fn check_dirty_replay(dir: &Path, name: &str, dirty: &[u8], want: &[u8]) {
    let ours = write_file(dir, &format!("{name}.vhdx"), dirty);
    let theirs = write_file(dir, &format!("{name}-qemu.vhdx"), dirty);
    // QEMU refuses to read it without a replay: the log really is dirty.
    let info = run("qemu-img", &["info", "-f", "vhdx", ours.to_str().unwrap()]);
    assert!(!info.status.success(), "qemu-img info accepted a dirty log");
    let ro = open_read_all(&ours, true);
    assert_same(&ro, want, "read-only in-memory replay");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        dirty,
        "read-only open changed the file"
    );
    qemu_repair("vhdx", &theirs, true, name);
    assert_same(&qemu_raw(&theirs), want, "QEMU's replay");
    let rw = open_read_all(&ours, false);
    assert_same(&rw, want, "read-write replay");
    assert_check_clean("vhdx", &ours);
    assert_same(&qemu_raw(&ours), want, "QEMU after imgfs's replay");
}

#[test]
fn single_entry_dirty_log_replays_like_qemu() {
    let d = tmpdir();
    let img = TestImage::build(d.path(), "base.vhdx", "vhdx")
        .opts("block_size=1M")
        .size("8M")
        .qemu()
        .path;
    let mut want = vec![0u8; 8 << 20];
    let dirty = durable_after(&img, |im, fault| {
        for (i, off) in [0u64, 3 * MIB + 4095, 6 * MIB].iter().enumerate() {
            let buf = random_bytes(i as u64, 300_000);
            im.write_at(&buf, *off).unwrap();
            want[*off as usize..*off as usize + buf.len()].copy_from_slice(&buf);
        }
        im.flush().unwrap();
        assert!(
            fault.pending_count() > 0,
            "in-place BAT write should still be pending"
        );
    });
    check_dirty_replay(d.path(), "single", &dirty, &want);
}

#[test]
fn wrapped_log_with_many_entries_replays_like_qemu() {
    let d = tmpdir();
    // 1 MiB log (256 sectors); 64 MiB disk in 1 MiB blocks; each flush logs 1-3 pages.
    let img = TestImage::build(d.path(), "base.vhdx", "vhdx")
        .opts("block_size=1M,block_state_zero=off")
        .size("64M")
        .qemu()
        .path;
    let size = 64u64 << 20;
    let mut want = vec![0u8; size as usize];
    let dirty = durable_after(&img, |im, _| {
        let mut rng = imgfs::host::SplitMix64::new(99);
        for i in 0..250u64 {
            let off = rng.below(size - 5000);
            let buf = random_bytes(1000 + i, 1 + rng.below(5000) as usize);
            im.write_at(&buf, off).unwrap();
            want[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            if i % 7 == 3 {
                im.write_zeroes(off / MIB * MIB, MIB, i % 2 == 0).unwrap();
                want[(off / MIB * MIB) as usize..(off / MIB * MIB + MIB) as usize].fill(0);
            }
            im.flush().unwrap();
        }
        let stats = im.format_stats();
        // More than 256 log sectors were written: the ring wrapped.
        assert!(stats.log_entries_written >= 100, "{stats:?}");
    });
    check_dirty_replay(d.path(), "wrapped", &dirty, &want);
}

#[test]
fn check_reports_dirty_log_and_repair_replays_it() {
    use imgfs::image::Repair;
    let d = tmpdir();
    let img = TestImage::build(d.path(), "c.vhdx", "vhdx")
        .opts("block_size=1M")
        .size("4M")
        .qemu()
        .path;
    let buf = random_bytes(5, 100_000);
    let dirty = durable_after(&img, |im, _| {
        im.write_at(&buf, 12345).unwrap();
        im.flush().unwrap();
    });
    let p = write_file(d.path(), "dirty.vhdx", &dirty);
    let vhdx = imgfs::formats::by_name("vhdx").unwrap();
    let r = vhdx
        .check(
            imgfs::host::HostFile::open(&p, false).unwrap(),
            Repair::None,
        )
        .unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        dirty,
        "check without -r wrote the file"
    );
    let r = vhdx
        .check(imgfs::host::HostFile::open(&p, true).unwrap(), Repair::All)
        .unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    let r = vhdx
        .check(
            imgfs::host::HostFile::open(&p, false).unwrap(),
            Repair::None,
        )
        .unwrap();
    assert_eq!((r.exit_code(), r.allocated_clusters), (0, 1), "{r:?}");
    assert_check_clean("vhdx", &p);
    let mut want = vec![0u8; 4 << 20];
    want[12345..12345 + buf.len()].copy_from_slice(&buf);
    assert_same(&qemu_raw(&p), &want, "after imgfs check -r all");
}

#[test]
fn huge_virtual_disk_opens_fast_with_bounded_memory() {
    let d = tmpdir();
    let size = 64u64 << 40;
    let img = TestImage::build(d.path(), "huge.vhdx", "vhdx")
        .opt("block_size", "1M")
        .size(size)
        .imgfs()
        .path;
    let t = std::time::Instant::now();
    let im = Image::open(&img, &OpenOpts::default()).unwrap();
    assert!(t.elapsed().as_secs() < 2, "open took {:?}", t.elapsed());
    assert_eq!(im.size(), size);
    let buf = random_bytes(8, 70_000);
    for off in [0, size / 2 + 12345, size - buf.len() as u64] {
        im.write_at(&buf, off).unwrap();
        let mut back = vec![0u8; buf.len()];
        im.read_at(&mut back, off).unwrap();
        assert_same(&back, &buf, "huge disk round trip");
    }
    im.close().unwrap();
    let s = im.format_stats().cache;
    // 512 MiB of BAT, of which only a few pages were ever read.
    assert!(s.misses < 20, "{s:?}");
    drop(im);
    let im = Image::open(&img, &open_opts(true)).unwrap();
    let mut back = vec![0u8; buf.len()];
    im.read_at(&mut back, size - buf.len() as u64).unwrap();
    assert_same(&back, &buf, "huge disk reopen");
}

/// Allocating 4 KiB writes, one per 1 MiB block, flushed every 16 writes: imgfs (one log entry
/// per flush) against qemu-io (a log entry, header updates and several syncs per allocation).
/// Run with `cargo test --release --test vhdx_log -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_allocating_writes_against_qemu() {
    let d = tmpdir();
    let n = 256u64;
    let mk = |name: &str| {
        TestImage::build(d.path(), name, "vhdx")
            .opt("block_size", "1M")
            .size(format!("{n}M"))
            .qemu()
            .path
    };
    let ours = mk("ours.vhdx");
    let im = Image::open(&ours, &OpenOpts::default()).unwrap();
    let buf = random_bytes(1, 4096);
    let t = std::time::Instant::now();
    for i in 0..n {
        im.write_at(&buf, i * MIB + 4096).unwrap();
        if i % 16 == 15 {
            im.flush().unwrap();
        }
    }
    im.close().unwrap();
    let ours_t = t.elapsed();
    drop(im);
    let theirs = mk("theirs.vhdx");
    let f = write_file(d.path(), "buf", &buf);
    let mut cmds = vec![];
    for i in 0..n {
        cmds.push(format!("write -s {} {} 4096", f.display(), i * MIB + 4096));
        if i % 16 == 15 {
            cmds.push("flush".to_string());
        }
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let t = std::time::Instant::now();
    qemu_io("vhdx", &theirs, &refs);
    let theirs_t = t.elapsed();
    eprintln!("{n} allocating writes, flush every 16: imgfs {ours_t:?}, qemu-io {theirs_t:?}");
    assert_check_clean("vhdx", &ours);
    assert_same(&qemu_raw(&ours), &qemu_raw(&theirs), "same content");
}

/// LD_PRELOAD shim: fails (EIO) every write that touches [SHIM_FAIL_START, SHIM_FAIL_END) after
/// the first SHIM_SKIP of them. Aimed at the BAT, it stops QEMU between its durable log entry
/// and the in-place BAT update (QEMU writes from thread-pool threads, so it hooks the calls).
const SHIM_C: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdatomic.h>
static atomic_long seen;
static int hit(off_t off, size_t len) {
    const char *s = getenv("SHIM_FAIL_START"), *e = getenv("SHIM_FAIL_END"), *k = getenv("SHIM_SKIP");
    if (!s || !e) return 0;
    long long a = atoll(s), b = atoll(e);
    if (off >= b || off + (off_t)len <= a) return 0;
    return atomic_fetch_add(&seen, 1) >= (k ? atoll(k) : 0);
}
static size_t iovlen(const struct iovec *v, int n) {
    size_t t = 0;
    for (int i = 0; i < n; i++) t += v[i].iov_len;
    return t;
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    if (hit(off, n)) { errno = EIO; return -1; }
    return real(fd, buf, n, off);
}
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) { return pwrite64(fd, buf, n, off); }
ssize_t pwritev64(int fd, const struct iovec *v, int c, off_t off) {
    static ssize_t (*real)(int, const struct iovec *, int, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwritev64");
    if (hit(off, iovlen(v, c))) { errno = EIO; return -1; }
    return real(fd, v, c, off);
}
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t off) { return pwritev64(fd, v, c, off); }
ssize_t pwritev64v2(int fd, const struct iovec *v, int c, off_t off, int fl) {
    static ssize_t (*real)(int, const struct iovec *, int, off_t, int);
    if (!real) real = dlsym(RTLD_NEXT, "pwritev64v2");
    if (hit(off, iovlen(v, c))) { errno = EIO; return -1; }
    return real(fd, v, c, off, fl);
}
ssize_t pwritev2(int fd, const struct iovec *v, int c, off_t off, int fl) {
    return pwritev64v2(fd, v, c, off, fl);
}
"#;

#[test]
fn logs_left_dirty_by_qemu_replay_like_qemu_check() {
    let d = tmpdir();
    let src = write_file(d.path(), "shim.c", SHIM_C.as_bytes());
    let so = d.path().join("shim.so");
    ok(
        "gcc",
        &[
            "-shared",
            "-fPIC",
            "-O2",
            "-o",
            so.to_str().unwrap(),
            src.to_str().unwrap(),
            "-ldl",
        ],
    );
    for skip in [0u64, 2, 5] {
        let img = TestImage::build(d.path(), &format!("q{skip}.vhdx"), "vhdx")
            .opts("block_size=1M")
            .size("12M")
            .qemu()
            .path;
        // Earlier clean sessions leave older entries (other log GUIDs) in the log region.
        qemu_io("vhdx", &img, &["write -P 7 5M 64k", "write -P 8 9M 4k"]);
        let raw = std::fs::read(&img).unwrap();
        let bat = u64::from_le_bytes(raw[(192 << 10) + 32..(192 << 10) + 40].try_into().unwrap());
        let mut args = vec![
            "-f".to_string(),
            "vhdx".to_string(),
            img.to_str().unwrap().to_string(),
        ];
        for i in 0..8u64 {
            let f = write_file(
                d.path(),
                &format!("d{skip}-{i}"),
                &random_bytes(skip * 10 + i, 70_000),
            );
            args.push("-c".into());
            args.push(format!(
                "write -s {} {} 70000",
                f.display(),
                i * 1_300_000 + 333
            ));
        }
        let out = std::process::Command::new("qemu-io")
            .args(&args)
            .env("LD_PRELOAD", &so)
            .env("SHIM_FAIL_START", bat.to_string())
            .env("SHIM_FAIL_END", (bat + MIB).to_string())
            .env("SHIM_SKIP", skip.to_string())
            .run_output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("write failed"),
            "the shim did not stop QEMU: {text}"
        );
        let info = run("qemu-img", &["info", "-f", "vhdx", img.to_str().unwrap()]);
        assert!(
            !info.status.success(),
            "QEMU left no dirty log (skip={skip})"
        );
        let dirty = std::fs::read(&img).unwrap();
        let theirs = write_file(d.path(), &format!("q{skip}-qemu.vhdx"), &dirty);
        qemu_repair("vhdx", &theirs, true, &format!("skip={skip}"));
        let want = qemu_raw(&theirs);
        // The write whose BAT update failed is there only through the log.
        let at = (skip * 1_300_000 + 333) as usize;
        assert_same(
            &want[at..at + 70_000],
            &random_bytes(skip * 10 + skip, 70_000),
            "logged write",
        );
        assert_same(
            &open_read_all(&img, true),
            &want,
            "imgfs in-memory replay of QEMU's log",
        );
        assert_eq!(
            std::fs::read(&img).unwrap(),
            dirty,
            "read-only open wrote the file"
        );
        assert_same(
            &open_read_all(&img, false),
            &want,
            "imgfs replay of QEMU's log",
        );
        assert_check_clean("vhdx", &img);
        assert_same(&qemu_raw(&img), &want, "QEMU after imgfs's replay");
    }
}
