//! qcow2 crash safety: seeded workloads through the engine on a fault-injecting file, power cut
//! at a random point (durable bytes + a random subset of unsynced writes, in random order).
//! After every cut the image must open (read-only and read-write) with every fsync'd byte
//! intact; on a sample of cuts `qemu-img check` must find no corruption (leaks allowed).

mod common;

use common::*;
use imgfs::crashsim::Workload;

fn crash_series(
    opts: &str,
    size: &str,
    backing: bool,
    seeds: std::ops::Range<u64>,
    work: &Workload,
) {
    let d = tmpdir();
    let mut spec = TestImage::build(d.path(), "crash.qcow2", "qcow2")
        .opts(opts)
        .size(size);
    if backing {
        std::fs::write(d.path().join("base.raw"), random_bytes(77, 2 << 20)).unwrap();
        spec = spec.backing("base.raw", Some("raw"));
    }
    let t = spec.qemu();
    if !backing {
        // Some allocated, zero and compressed clusters to start from.
        let data = write_file(d.path(), "seed.bin", &random_bytes(5, 300_000));
        let w = format!("write -s {} 0 300000", data.display());
        t.io(&[&w, "write -z 400000 100000"]);
        let c = format!("write -c -s {} 1048576 65536", data.display());
        t.io(&[&c]);
    }
    let mut checked = 0;
    t.crash_loop(seeds, work, 8, |seed, crashed| {
        // Resolve the backing file the same way as the original.
        assert_no_corruption("qcow2", crashed, &format!("seed {seed} ({opts})"));
        checked += 1;
    });
    assert!(checked > 0);
}

fn work() -> Workload {
    Workload {
        ops: 40,
        max_write: 96 << 10,
        discard_pct: 12,
        fsync_pct: 12,
        ..Workload::default()
    }
}

#[test]
fn crash_64k_clusters() {
    crash_series("cluster_size=65536", "2M", false, 0..60, &work());
}

#[test]
fn crash_4k_clusters_small_refcounts() {
    // 4K clusters with 2-bit (sub-byte, packed) refcounts.
    crash_series(
        "cluster_size=4096,refcount_bits=2",
        "2M",
        false,
        0..60,
        &work(),
    );
}

#[test]
fn crash_lazy_refcounts() {
    crash_series(
        "cluster_size=4096,lazy_refcounts=on",
        "2M",
        false,
        0..40,
        &work(),
    );
}

#[test]
fn crash_extended_l2_over_backing() {
    crash_series(
        "cluster_size=32768,extended_l2=on",
        "2M",
        true,
        0..35,
        &work(),
    );
}

#[test]
fn crash_v2_over_backing() {
    crash_series("compat=0.10,cluster_size=4096", "2M", true, 0..30, &work());
}

#[test]
fn crash_refcount_table_growth() {
    // 512-byte clusters, 64-bit refcounts: blocks and the refcount table move during the run.
    let w = Workload {
        ops: 30,
        max_write: 64 << 10,
        discard_pct: 10,
        fsync_pct: 15,
        ..Workload::default()
    };
    crash_series("cluster_size=512,refcount_bits=64", "2M", false, 0..25, &w);
}

/// crashsim's check with a metadata cache of a few tables, so that L2 tables and refcount
/// blocks reach the disk through eviction (TableIo::store and its dependencies) rather than
/// through flush.
#[test]
fn crash_with_tiny_cache_evictions() {
    use imgfs::host::{FaultFile, SplitMix64};
    use imgfs::{Image, OpenOpts};
    let d = tmpdir();
    let t = TestImage::build(d.path(), "tiny.qcow2", "qcow2")
        .opt("cluster_size", 512)
        .size("2M")
        .qemu();
    let (p, initial) = (t.path.clone(), t.bytes());
    let crashed = d.path().join("crashed.qcow2");
    let opts = |read_only| OpenOpts {
        format: Some("qcow2".into()),
        lock: false,
        read_only,
        cache_size: 2048,
        ..OpenOpts::default()
    };
    let mut writebacks = 0;
    for seed in 0..40u64 {
        let mut rng = SplitMix64::new(seed);
        let fault = FaultFile::new(initial.clone());
        let img = Image::open_host(fault.host_file(&p, true), &opts(false)).unwrap();
        let size = img.size();
        let mut model = vec![0u8; size as usize];
        let mut durable = model.clone();
        let mut unsure = vec![false; size as usize];
        let mut buf = vec![0u8; 64 << 10];
        for _ in 0..rng.below(50) {
            let roll = rng.below(100);
            if roll < 12 {
                img.flush().unwrap();
                durable.copy_from_slice(&model);
                unsure.fill(false);
                continue;
            }
            let off = rng.below(size);
            let len = (1 + rng.below(64 << 10)).min(size - off);
            let r = off as usize..(off + len) as usize;
            if roll < 22 {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[r.clone()].fill(0);
            } else {
                rng.fill(&mut buf[..len as usize]);
                img.write_at(&buf[..len as usize], off).unwrap();
                model[r.clone()].copy_from_slice(&buf[..len as usize]);
            }
            unsure[r].fill(true);
        }
        writebacks += img.format_stats().cache.evictions;
        let image = fault.crash_image(&mut rng);
        drop(img); // the crashed bytes are taken; closing writes only to the discarded file
        std::fs::write(&crashed, &image).unwrap();
        assert_no_corruption("qcow2", &crashed, &format!("seed {seed}"));
        let f2 = FaultFile::new(image);
        let img = Image::open_host(f2.host_file(&p, false), &opts(true)).unwrap();
        let got = engine_read_all(&img);
        if let Some(i) = (0..got.len()).find(|&i| !unsure[i] && got[i] != durable[i]) {
            panic!("seed {seed}: fsync'd byte {i:#x} lost");
        }
    }
    assert!(
        writebacks > 100,
        "the cache should have evicted tables ({writebacks})"
    );
}

#[test]
fn crash_starting_from_a_dirty_image() {
    // A lazy-refcounts image left dirty by a killed qemu-io: the read-write open rebuilds the
    // refcounts first; cuts during and after that must still leave a usable image.
    let d = tmpdir();
    let t = TestImage::build(d.path(), "dirty.qcow2", "qcow2")
        .opts("cluster_size=4096,lazy_refcounts=on")
        .size("2M")
        .qemu();
    let p = t.path.clone();
    let _ = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            p.to_str().unwrap(),
            "-c",
            "write -P 0x33 0 300000",
            "-c",
            "write -P 0x44 1000000 8192",
            "-c",
            "abort",
        ],
    );
    assert_ne!(t.bytes()[72 + 7] & 1, 0, "fixture should be dirty");
    t.crash_loop(0..30, &work(), 5, |seed, crashed| {
        assert_no_corruption("qcow2", crashed, &format!("seed {seed}"))
    });
}
