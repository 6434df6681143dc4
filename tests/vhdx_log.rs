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

fn fault_open(fault: &std::sync::Arc<FaultFile>, name: &Path) -> Image {
    Image::open_host(
        fault.host_file(name, true),
        &OpenOpts {
            format: Some("vhdx".into()),
            lock: false,
            ..OpenOpts::default()
        },
    )
    .unwrap()
}

fn read_all(p: &Path, read_only: bool) -> Vec<u8> {
    let im = Image::open(
        p,
        &OpenOpts {
            read_only,
            ..OpenOpts::default()
        },
    )
    .unwrap();
    let v = engine_read_all(&im);
    im.close().unwrap();
    v
}

/// `dirty` = durable bytes of a cut-off writer; `want` = the guest content that was flushed.
fn check_dirty_replay(dir: &Path, name: &str, dirty: &[u8], want: &[u8]) {
    let ours = write_file(dir, &format!("{name}.vhdx"), dirty);
    let theirs = write_file(dir, &format!("{name}-qemu.vhdx"), dirty);
    // QEMU refuses to read it without a replay: the log really is dirty.
    let info = run("qemu-img", &["info", "-f", "vhdx", ours.to_str().unwrap()]);
    assert!(!info.status.success(), "qemu-img info accepted a dirty log");
    let ro = read_all(&ours, true);
    assert_same(&ro, want, "read-only in-memory replay");
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        dirty,
        "read-only open changed the file"
    );
    let out = run(
        "qemu-img",
        &["check", "-r", "all", "-f", "vhdx", theirs.to_str().unwrap()],
    );
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check -r all: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(&qemu_raw(&theirs), want, "QEMU's replay");
    let rw = read_all(&ours, false);
    assert_same(&rw, want, "read-write replay");
    assert_check_clean("vhdx", &ours);
    assert_same(&qemu_raw(&ours), want, "QEMU after imgfs's replay");
}

#[test]
fn single_entry_dirty_log_replays_like_qemu() {
    let d = tmpdir();
    let img = d.path().join("base.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        img.to_str().unwrap(),
        "8M",
    ]);
    let fault = FaultFile::new(std::fs::read(&img).unwrap());
    let im = fault_open(&fault, &img);
    let mut want = vec![0u8; 8 << 20];
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
    let dirty = fault.durable();
    std::mem::forget(im);
    check_dirty_replay(d.path(), "single", &dirty, &want);
}

#[test]
fn wrapped_log_with_many_entries_replays_like_qemu() {
    let d = tmpdir();
    let img = d.path().join("base.vhdx");
    // 1 MiB log (256 sectors); 64 MiB disk in 1 MiB blocks; each flush logs 1-3 pages.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M,block_state_zero=off",
        img.to_str().unwrap(),
        "64M",
    ]);
    let fault = FaultFile::new(std::fs::read(&img).unwrap());
    let im = fault_open(&fault, &img);
    let size = 64u64 << 20;
    let mut want = vec![0u8; size as usize];
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
    let dirty = fault.durable();
    std::mem::forget(im);
    check_dirty_replay(d.path(), "wrapped", &dirty, &want);
}

#[test]
fn check_reports_dirty_log_and_repair_replays_it() {
    use imgfs::image::Repair;
    let d = tmpdir();
    let img = d.path().join("c.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        img.to_str().unwrap(),
        "4M",
    ]);
    let fault = FaultFile::new(std::fs::read(&img).unwrap());
    let im = fault_open(&fault, &img);
    let buf = random_bytes(5, 100_000);
    im.write_at(&buf, 12345).unwrap();
    im.flush().unwrap();
    let dirty = fault.durable();
    std::mem::forget(im);
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
    let img = d.path().join("huge.vhdx");
    let size = 64u64 << 40;
    let f = imgfs::host::HostFile::create(&img).unwrap();
    let co = imgfs::image::CreateOpts {
        size,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..Default::default()
    };
    imgfs::formats::by_name("vhdx")
        .unwrap()
        .create(&f, &co)
        .unwrap();
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
    let im = Image::open(
        &img,
        &OpenOpts {
            read_only: true,
            ..OpenOpts::default()
        },
    )
    .unwrap();
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
        let p = d.path().join(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p.to_str().unwrap(),
            &format!("{}M", n),
        ]);
        p
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
