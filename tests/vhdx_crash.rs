//! VHDX crash safety: power cuts at random points of random workloads (crashsim), reopened
//! read-only (log replayed in memory) and read-write (replayed into the file); a sample of the
//! crashed images is also replayed by QEMU (`qemu-img check -r all`) and must match imgfs.

mod common;

use common::*;
use imgfs::crashsim::{run_many, Workload};
use imgfs::host::HostFile;
use imgfs::image::{BackingRef, CreateOpts};
use imgfs::{Image, OpenOpts};
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
    let img = d.path().join("base.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        img.to_str().unwrap(),
        "6M",
    ]);
    let f = write_file(d.path(), "seed", &random_bytes(1, 1 << 20));
    qemu_io(
        "vhdx",
        &img,
        &[&format!("write -s {} 512K 1M", f.display())],
    );
    let initial = std::fs::read(&img).unwrap();
    let t = std::time::Instant::now();
    let want = seeds(100);
    let n = run_many(&initial, &img, "vhdx", 0..want, &work(), |seed, cut| {
        if seed % 20 == 0 {
            cross_check(d.path(), seed, &cut.image);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(n, want);
    eprintln!("dynamic: {n} cuts in {:?}", t.elapsed());
}

#[test]
fn differencing_child_survives_power_cuts() {
    let d = tmpdir();
    let parent = d.path().join("p.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        parent.to_str().unwrap(),
        "2M",
    ]);
    let f = write_file(d.path(), "seed", &random_bytes(2, 2 << 20));
    qemu_io(
        "vhdx",
        &parent,
        &[&format!("write -s {} 0 2M", f.display())],
    );
    let child = d.path().join("c.vhdx");
    {
        let info = Image::open(
            &parent,
            &OpenOpts {
                read_only: true,
                ..OpenOpts::default()
            },
        )
        .unwrap()
        .info();
        let co = CreateOpts {
            backing: Some(BackingRef {
                name: "p.vhdx".into(),
                format: Some("vhdx".into()),
            }),
            backing_info: Some(info),
            options: [("block_size".to_string(), "1M".to_string())].into(),
            ..CreateOpts::default()
        };
        imgfs::formats::by_name("vhdx")
            .unwrap()
            .create(&HostFile::create(&child).unwrap(), &co)
            .unwrap();
    }
    let initial = std::fs::read(&child).unwrap();
    let t = std::time::Instant::now();
    let want = seeds(60);
    let w = Workload {
        max_write: 256 << 10,
        ..work()
    };
    let n = run_many(&initial, &child, "vhdx", 0..want, &w, |_, _| Ok(())).unwrap();
    eprintln!("differencing: {n} cuts in {:?}", t.elapsed());
    assert_eq!(n, want);
    assert_same(
        &qemu_raw(&parent),
        &random_bytes(2, 2 << 20),
        "parent unchanged",
    );
}
