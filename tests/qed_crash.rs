//! QED power cuts: the crash simulator over QEMU-made images (with and without a backing file)
//! and a loop with a two-table cache so L2 tables are written back between fsyncs. Some crashed
//! images also go through `qemu-img check` (0, or 3 = leaks only) and a read-write qemu-io open.

mod common;
use common::*;
use imgfs::crashsim::{self, Workload};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Power cuts over a QEMU-made image. The crash checker's cost grows with the virtual size
/// (byte-wise model in a debug build), so the images are small.
fn crash_many(cluster: &str, size: &str, prefill: bool, seeds: std::ops::Range<u64>, every: u64) {
    let dir = tmpdir();
    let img = dir.path().join(format!("crash-{cluster}.qed"));
    let o = format!("cluster_size={cluster},table_size=2");
    qemu_img(&["create", "-f", "qed", "-o", &o, p(&img), size]);
    if prefill {
        let data = write_file(dir.path(), "d", &random_bytes(1, 65536 * 3));
        qemu_io(
            "qed",
            &img,
            &[&format!("write -s {} 512k 196608", p(&data))],
        );
    }
    let initial = std::fs::read(&img).unwrap();
    let work = Workload {
        ops: 40,
        max_write: 96 << 10,
        ..Workload::default()
    };
    let crashed = dir.path().join("crashed.qed");
    let n = crashsim::run_many(&initial, &img, "qed", seeds.clone(), &work, |seed, r| {
        if seed % every == 0 {
            std::fs::write(&crashed, &r.image).unwrap();
            let (code, out) = qemu_check("qed", &crashed);
            assert!(
                code == 0 || code == 3,
                "seed {seed}: qemu-img check {code}: {out}"
            );
            // QEMU opens it read-write (repairing it) and reads it all.
            qemu_io("qed", &crashed, &[&format!("read 0 {size}")]);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(n, seeds.end - seeds.start);
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
    let img = dir.path().join("over.qed");
    qemu_img(&[
        "create",
        "-f",
        "qed",
        "-o",
        "cluster_size=65536",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&img),
        "2M",
    ]);
    qemu_io("qed", &img, &["write -z 1M 64k"]);
    let initial = std::fs::read(&img).unwrap();
    let work = Workload {
        ops: 30,
        max_write: 20 << 10,
        ..Workload::default()
    };
    let crashed = dir.path().join("crashed.qed");
    let n = crashsim::run_many(&initial, &img, "qed", 0..80, &work, |seed, r| {
        if seed % 25 == 0 {
            std::fs::write(&crashed, &r.image).unwrap();
            let (code, out) = qemu_check("qed", &crashed);
            assert!(
                code == 0 || code == 3,
                "seed {seed}: qemu-img check {code}: {out}"
            );
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 80);
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
    let img = dir.path().join("ev.qed");
    qemu_img(&[
        "create",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&img),
    ]);
    let initial = std::fs::read(&img).unwrap();
    // A two-table cache (the smallest): dirty tables are written back by eviction between fsyncs.
    let work = Workload {
        ops: 60,
        max_write: 16_000,
        discard_pct: 0,
        fsync_pct: 10,
        cache_size: 0,
        ..Workload::default()
    };
    let mut evictions = 0;
    let n = crashsim::run_many(&initial, &img, "qed", 0..150, &work, |seed, cut| {
        evictions += cut.evictions;
        if seed % 30 == 0 {
            let c = dir.path().join("c.qed");
            std::fs::write(&c, &cut.image).unwrap();
            let (code, out) = qemu_check("qed", &c);
            assert!(code == 0 || code == 3, "seed {seed}: {out}");
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(n, 150);
    assert!(evictions > 100, "only {evictions} evictions");
}
