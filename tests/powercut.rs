//! Power-cut simulation over every writable format, through the real engine on the fault-injecting
//! host file: a seeded workload (writes, discards, fsyncs), a cut at a random point keeping what was
//! synced plus a random subset of later writes in random order, then: the image reopens (read-only and
//! read-write), every byte fsync'd before the cut reads back, and `qemu-img check` finds no corruption
//! (leaks allowed) on a sample of the crashed images. `IMGFS_CUTS=N` sets the cuts per format
//! (scripts/crash-bench.sh runs 1,000+); the counts are printed.

mod common;
use common::*;
use imgfs::crashsim::{run_many, Workload};

fn cuts() -> u64 {
    std::env::var("IMGFS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Images to cut, per format: (qemu-img create options, virtual size).
fn variants(fmt: &str) -> Vec<(&'static str, &'static str)> {
    match fmt {
        "raw" => vec![("", "4M")],
        "qcow2" => vec![
            ("cluster_size=4096", "4M"),
            ("cluster_size=65536,lazy_refcounts=on", "8M"),
        ],
        "qed" => vec![("cluster_size=4096", "4M")],
        "qcow" => vec![("", "4M")],
        "vhdx" => vec![("block_size=1M,log_size=1M", "8M")],
        "vmdk" => vec![("", "4M"), ("zeroed_grain=on", "4M")],
        _ => vec![],
    }
}

fn powercut(fmt: &str) {
    if imgfs::formats::by_name(fmt).is_err() {
        eprintln!("{fmt}: not registered yet; skipped");
        return;
    }
    let t = tmpdir();
    let total = cuts();
    let vs = variants(fmt);
    let per = total.div_ceil(vs.len() as u64);
    let (mut survived, mut checked, mut leaky) = (0, 0, 0);
    for (vi, (opts, size)) in vs.iter().enumerate() {
        let img = t.path().join(format!("v{vi}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.to_str().unwrap(), size]);
        qemu_img(&args);
        let initial = std::fs::read(&img).unwrap();
        let crashed = t.path().join(format!("crashed.{fmt}"));
        // Half the seeds with a two-table metadata cache, so tables are written back by eviction
        // between fsyncs, not only by flushes.
        for (half, cache_size) in [(0u64, imgfs::image::DEFAULT_CACHE_SIZE), (1, 1)] {
            let work = Workload {
                ops: 40,
                max_write: 96 << 10,
                cache_size,
                ..Workload::default()
            };
            let start = vi as u64 * 100_000 + half * 50_000;
            let n = per / 2 + half * (per % 2);
            survived += run_many(&initial, &img, fmt, start..start + n, &work, |seed, cut| {
                // qemu-img check on every 8th crashed image (qcow has no checker in QEMU).
                if seed % 8 == 0 && fmt != "raw" && fmt != "qcow" {
                    std::fs::write(&crashed, &cut.image).unwrap();
                    if fmt == "vhdx" {
                        vhdx_replay_agrees(&crashed, seed);
                    }
                    let (code, out) = qemu_check(fmt, &crashed);
                    assert!(
                        code == 0 || code == 3,
                        "{fmt} seed {seed}: qemu-img check after the cut: {out}"
                    );
                    checked += 1;
                    leaky += u64::from(code == 3);
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{fmt} ({opts}, cache {cache_size}): {e}"));
        }
    }
    eprintln!(
        "{fmt}: {survived} power cuts survived; {checked} crashed images checked by qemu-img ({leaky} with leaks only)"
    );
}

/// QEMU will not open a VHDX whose log needs replaying read-only: let it replay (`check -r all`)
/// and require the guest view it then shows to equal imgfs's own replay of the same crashed file.
fn vhdx_replay_agrees(crashed: &std::path::Path, seed: u64) {
    let opts = imgfs::image::OpenOpts {
        read_only: true,
        lock: false,
        format: Some("vhdx".into()),
        ..Default::default()
    };
    let ours = engine_read_all(&imgfs::Image::open(crashed, &opts).unwrap());
    qemu_repair("vhdx", crashed, false, &format!("vhdx seed {seed}"));
    assert_same(
        &qemu_raw(crashed),
        &ours,
        &format!("vhdx seed {seed}: QEMU's replay vs imgfs's"),
    );
}

#[test]
fn powercut_raw() {
    powercut("raw");
}

#[test]
fn powercut_qcow2() {
    powercut("qcow2");
}

#[test]
fn powercut_qed() {
    powercut("qed");
}

#[test]
fn powercut_qcow() {
    powercut("qcow");
}

#[test]
fn powercut_vhdx() {
    powercut("vhdx");
}

#[test]
fn powercut_vmdk() {
    powercut("vmdk");
}
