//! qcow2 crash safety: seeded workloads through the engine on a fault-injecting file, power cut
//! at a random point (durable bytes + a random subset of unsynced writes, in random order).
//! After every cut the image must open (read-only and read-write) with every fsync'd byte
//! intact; on a sample of cuts `qemu-img check` must find no corruption (leaks allowed).

mod common;

use common::*;
use imgfs::crashsim::{run_many, Workload};
use std::path::Path;

fn crash_series(
    opts: &str,
    size: &str,
    backing: bool,
    seeds: std::ops::Range<u64>,
    work: &Workload,
) {
    let d = tmpdir();
    let p = d.path().join("crash.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if backing {
        std::fs::write(d.path().join("base.raw"), random_bytes(77, 2 << 20)).unwrap();
        args.extend(["-b", "base.raw", "-F", "raw"]);
    }
    args.push(p.to_str().unwrap());
    args.push(size);
    qemu_img(&args);
    if !backing {
        // Some allocated, zero and compressed clusters to start from.
        let data = write_file(d.path(), "seed.bin", &random_bytes(5, 300_000));
        let w = format!("write -s {} 0 300000", data.display());
        qemu_io("qcow2", &p, &[&w, "write -z 400000 100000"]);
        let c = format!("write -c -s {} 1048576 65536", data.display());
        qemu_io("qcow2", &p, &[&c]);
    }
    let initial = std::fs::read(&p).unwrap();
    let crashed = d.path().join("crashed.qcow2");
    let mut checked = 0;
    let n = run_many(&initial, &p, "qcow2", seeds, work, |seed, cut| {
        if seed % 8 == 0 {
            std::fs::write(&crashed, &cut.image).unwrap();
            // Resolve the backing file the same way as the original.
            let (code, out) = qemu_check("qcow2", &crashed);
            assert!(
                code == 0 || code == 3,
                "seed {seed} ({opts}): qemu-img check {code}: {out}"
            );
            checked += 1;
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{opts}: {e}"));
    assert!(n > 0);
    assert!(checked > 0);
    let _ = Path::new(&p);
}

fn work() -> Workload {
    Workload {
        ops: 40,
        max_write: 96 << 10,
        discard_pct: 12,
        fsync_pct: 12,
    }
}

#[test]
fn crash_64k_clusters() {
    crash_series("cluster_size=65536", "2M", false, 0..70, &work());
}

#[test]
fn crash_4k_clusters_small_refcounts() {
    // 4K clusters with 2-bit refcounts: refcount blocks and the table grow during the run.
    crash_series(
        "cluster_size=4096,refcount_bits=2",
        "2M",
        false,
        0..70,
        &work(),
    );
}

#[test]
fn crash_lazy_refcounts() {
    crash_series(
        "cluster_size=4096,lazy_refcounts=on",
        "2M",
        false,
        0..50,
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
    };
    crash_series("cluster_size=512,refcount_bits=64", "2M", false, 0..25, &w);
}
