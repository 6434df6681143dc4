//! VHDX crash safety: power cuts at random points of random workloads (crashsim), reopened
//! read-only (log replayed in memory) and read-write (replayed into the file); a sample of the
//! crashed images is also replayed by QEMU (`qemu-img check -r all`) and must match imgfs.

mod common;

use common::*;
use imgfs::crashsim::Workload;
use std::path::Path;

/// The crashed bytes of `seed`: imgfs (read-only, in memory) and QEMU (`check -r all`) must
/// agree, and after imgfs's own replay QEMU must find the image clean.
fn cross_check(dir: &Path, seed: u64, image: &[u8]) {
    let ours = dir.join(format!("cut{seed}.vhdx"));
    let theirs = dir.join(format!("cut{seed}-qemu.vhdx"));
    std::fs::write(&ours, image).unwrap();
    std::fs::write(&theirs, image).unwrap();
    let in_memory = open_read_all(&ours, true);
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        image,
        "read-only open wrote the file"
    );
    qemu_repair("vhdx", &theirs, true, &format!("seed {seed}"));
    assert_same(
        &qemu_raw(&theirs),
        &in_memory,
        "QEMU replay vs imgfs in-memory replay",
    );
    let replayed = open_read_all(&ours, false);
    assert_same(&replayed, &in_memory, "imgfs replay into the file");
    assert_check_clean("vhdx", &ours);
    std::fs::remove_file(&ours).unwrap();
    std::fs::remove_file(&theirs).unwrap();
}

/// Seeds per test: VHDX_CRASH_SEEDS=N runs N (longer manual runs), default `default`.
fn seeds(default: u64) -> u64 {
    std::env::var("VHDX_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn work() -> Workload {
    Workload {
        ops: 16,
        max_write: 1100 << 10,
        discard_pct: 15,
        fsync_pct: 15,
        ..Workload::default()
    }
}

#[test]
fn dynamic_image_survives_power_cuts() {
    let d = tmpdir();
    let img = TestImage::build(d.path(), "base.vhdx", "vhdx")
        .opt("block_size", "1M")
        .size("6M")
        .qemu();
    img.write_random(1, 1 << 20, &[(512 << 10, 1 << 20)]);
    let t = std::time::Instant::now();
    let n = seeds(100);
    img.crash_loop(0..n, &work(), 20, |seed, cut| {
        cross_check(d.path(), seed, &std::fs::read(cut).unwrap())
    });
    eprintln!("dynamic: {n} cuts in {:?}", t.elapsed());
}

#[test]
fn differencing_child_survives_power_cuts() {
    let d = tmpdir();
    let parent = TestImage::build(d.path(), "p.vhdx", "vhdx")
        .opt("block_size", "1M")
        .size("2M")
        .qemu();
    parent.write_random(2, 2 << 20, &[(0, 2 << 20)]);
    let child = TestImage::build(d.path(), "c.vhdx", "vhdx")
        .opt("block_size", "1M")
        .backing("p.vhdx", Some("vhdx"))
        .imgfs();
    let t = std::time::Instant::now();
    let n = seeds(60);
    let w = Workload {
        max_write: 256 << 10,
        ..work()
    };
    child.crash_loop(0..n, &w, 0, |_, _| {});
    eprintln!("differencing: {n} cuts in {:?}", t.elapsed());
    assert_same(&parent.raw(), &random_bytes(2, 2 << 20), "parent unchanged");
}
