//! QED power cuts: the crash simulator over QEMU-made images (with and without a backing file)
//! and a loop with a two-table cache so L2 tables are written back between fsyncs. Some crashed
//! images also go through `qemu-img check` (0, or 3 = leaks only) and a read-write qemu-io open.

mod common;
use common::*;
use imgfs::crashsim::Workload;

const MIB: u64 = 1 << 20;

/// Power cuts over a QEMU-made image. The crash checker's cost grows with the virtual size
/// (byte-wise model in a debug build), so the images are small.
fn crash_many(cluster: &str, size: &str, prefill: bool, seeds: std::ops::Range<u64>, every: u64) {
    let dir = tmpdir();
    let t = TestImage::build(dir.path(), &format!("crash-{cluster}.qed"), "qed")
        .opt("cluster_size", cluster)
        .opt("table_size", 2)
        .size(size)
        .qemu();
    if prefill {
        t.write_random(1, 65536 * 3, &[(512 << 10, 196608)]);
    }
    let work = Workload {
        ops: 40,
        max_write: 96 << 10,
        ..Workload::default()
    };
    t.crash_loop(seeds, &work, every, |seed, crashed| {
        assert_no_corruption("qed", crashed, &format!("seed {seed}"));
        // QEMU opens it read-write (repairing it) and reads it all.
        qemu_io("qed", crashed, &[&format!("read 0 {size}")]);
    });
}

/// 4 KiB clusters, empty 2 MiB image: the first L2 table and the L1 update happen under cuts.
#[test]
fn crash_safety_4k() {
    crash_many("4096", "2M", false, 0..60, 10);
}

/// 64 KiB clusters over data QEMU wrote.
#[test]
fn crash_safety_64k() {
    crash_many("65536", "2M", true, 1000..1060, 10);
}

/// Power cuts over an overlay of a raw backing file: partial writes copy backing data into new
/// clusters, and that data must never be replaced by zeros (fill durable before the L2 entry).
#[test]
fn crash_safety_over_backing() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, random_bytes(77, 2 * MIB as usize)).unwrap();
    let t = TestImage::build(dir.path(), "over.qed", "qed")
        .opt("cluster_size", 65536)
        .backing("base.raw", Some("raw"))
        .size("2M")
        .qemu();
    t.io(&["write -z 1M 64k"]);
    let work = Workload {
        ops: 30,
        max_write: 20 << 10,
        ..Workload::default()
    };
    t.crash_loop(0..80, &work, 25, |seed, crashed| {
        assert_no_corruption("qed", crashed, &format!("seed {seed}"))
    });
}

/// Power cuts with a two-table L2 cache over a backing file: dirty L2 tables are written back on
/// eviction between fsyncs, so a cut can leave some of them durable. They must only ever point
/// at clusters whose copy-on-write fill is durable.
#[test]
fn crash_safety_with_evictions() {
    let dir = tmpdir();
    let size = 16 * MIB as usize;
    let base = dir.path().join("base.raw");
    std::fs::write(&base, random_bytes(123, size)).unwrap();
    let t = TestImage::build(dir.path(), "ev.qed", "qed")
        .opts("cluster_size=4096,table_size=2")
        .backing("base.raw", Some("raw"))
        .qemu();
    let work = eviction_workload();
    let evictions = t.crash_loop(0..150, &work, 30, |seed, c| {
        assert_no_corruption("qed", c, &format!("seed {seed}"))
    });
    assert!(evictions > 100, "only {evictions} evictions");
}
