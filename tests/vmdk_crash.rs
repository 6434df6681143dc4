//! VMDK power cuts (the crash simulator): a delta disk over a parent with a two-table cache (GTs
//! written back by eviction between fsyncs), a disk split over three sparse extent files,
//! each its own fault file cut independently, and an ESX vmfsSparse delta (a COWD extent file
//! of 512-byte grains, tables evicted between fsyncs). After every cut the image reopens and every byte
//! fsync'd before it reads back; `imgfs check` finds no corruption (leaks allowed) and, on a
//! sample, neither does `qemu-img check`. `IMGFS_CUTS=N` sets the cuts per case
//! (scripts/crash-bench.sh runs 1,000). The monolithic sparse image is in powercut.rs.

mod common;
#[path = "common/vmdk_esx.rs"]
mod vmdk_esx;
use common::*;
use imgfs::crashsim::{run_cut_files, Workload};
use imgfs::format::Repair;
use imgfs::host::HostFile;
use std::path::{Path, PathBuf};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn cuts(default: u64) -> u64 {
    std::env::var("IMGFS_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// imgfs's own checker on a crashed image: no corruption (leaks are expected after a cut).
fn imgfs_check(img: &Path, seed: u64) {
    let f = HostFile::open(img, false).unwrap();
    let r = imgfs::formats::by_name("vmdk")
        .unwrap()
        .check(f, Repair::None)
        .unwrap();
    assert_eq!(r.corruptions, 0, "seed {seed}: {:?}", r.messages);
}

/// Cut `n` times; after each, write the crashed files to `out` (same names) and check them.
fn crash_loop(img: &Path, siblings: &[PathBuf], out: &Path, n: u64, cache_size: u64) {
    let initial = std::fs::read(img).unwrap();
    let sibs: Vec<(PathBuf, Vec<u8>)> = siblings
        .iter()
        .map(|s| (s.canonicalize().unwrap(), std::fs::read(s).unwrap()))
        .collect();
    let work = Workload {
        ops: 40,
        max_write: 160 << 10,
        cache_size,
        ..Workload::default()
    };
    let crashed = out.join(img.file_name().unwrap());
    let mut evictions = 0;
    for seed in 0..n {
        let r = run_cut_files(initial.clone(), &sibs, img, "vmdk", seed, &work)
            .unwrap_or_else(|e| panic!("{}: {e}", img.display()));
        evictions += r.evictions;
        std::fs::write(&crashed, &r.image).unwrap();
        for (s, bytes) in siblings.iter().zip(&r.siblings) {
            std::fs::write(out.join(s.file_name().unwrap()), bytes).unwrap();
        }
        imgfs_check(&crashed, seed);
        if seed % 10 == 0 {
            let (code, msg) = qemu_check("vmdk", &crashed);
            assert!(
                code == 0 || code == 3,
                "seed {seed}: qemu-img check {code}: {msg}"
            );
            // Read-only: QEMU 10.0.2 refuses a read-write open of a descriptor listing several
            // small sparse extents ("Failed to get write lock" on the first, with no other user).
            ok(
                "qemu-io",
                &["-r", "-f", "vmdk", p(&crashed), "-c", "read 0 4M"],
            );
        }
    }
    eprintln!(
        "{}: {n} power cuts survived ({evictions} grain tables evicted)",
        img.display()
    );
}

/// A delta disk (zeroed-grain entries, copy-on-write fills from the parent) of `size` MiB; with
/// `cache_size` 1 the cache keeps two grain tables, so a disk of more than two (64 MiB) writes
/// tables back by eviction between fsyncs.
fn crash_delta(size_mib: u64, cache_size: u64, n: u64) {
    let dir = tmpdir();
    let base = dir.path().join("base.vmdk");
    let size = format!("{size_mib}M");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&base), &size]);
    let data = write_file(dir.path(), "d", &random_bytes(3, 4 << 20));
    qemu_io("vmdk", &base, &[&format!("write -s {} 0 4M", p(&data))]);
    let child = dir.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "zeroed_grain=on",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        p(&child),
    ]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(&base, out.join("base.vmdk")).unwrap();
    crash_loop(&child, &[], &out, n, cache_size);
}

#[test]
fn crash_delta_disk() {
    crash_delta(4, imgfs::image::DEFAULT_CACHE_SIZE, cuts(50));
}

#[test]
fn crash_delta_disk_with_evictions() {
    crash_delta(72, 1, cuts(50) / 10);
}

#[test]
fn crash_split_sparse_extents() {
    let dir = tmpdir();
    let d = dir.path();
    // Three 2 MiB sparse extents (a split disk with small extents, like twoGbMaxExtentSparse).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        p(&d.join("t.vmdk")),
        "2M",
    ]);
    let mut sibs = Vec::new();
    let mut desc = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"twoGbMaxExtentSparse\"\n\n",
    );
    for i in 1..=3 {
        let name = format!("s-s00{i}.vmdk");
        std::fs::copy(d.join("t-s001.vmdk"), d.join(&name)).unwrap();
        desc.push_str(&format!("RW 4096 SPARSE \"{name}\"\n"));
        sibs.push(d.join(name));
    }
    let img = write_file(d, "s.vmdk", desc.as_bytes());
    assert_check_clean("vmdk", &img);
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    crash_loop(
        &img,
        &sibs,
        &out,
        cuts(50),
        imgfs::image::DEFAULT_CACHE_SIZE,
    );
}

/// An ESX vmfsSparse delta (512-byte grains, 2 MiB per table) over an 8 MiB parent, its COWD
/// extent a fault file; a two-table cache writes tables back by eviction, new tables go into
/// ranges whose directory entry is empty, and the header's freeSector is raised before tables.
#[test]
fn crash_vmfs_sparse_delta() {
    let dir = tmpdir();
    let d = dir.path();
    let base = d.join("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", p(&base), "8M"]);
    let data = write_file(d, "d", &random_bytes(3, 4 << 20));
    qemu_io("vmdk", &base, &[&format!("write -s {} 0 4M", p(&data))]);
    let (img, _) = vmdk_esx::write_vmfs_sparse(d, "delta", "base.vmdk", &qemu_raw(&base), 1, 4);
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::copy(&base, out.join("base.vmdk")).unwrap();
    crash_loop(&img, &[d.join("delta-delta.vmdk")], &out, cuts(50), 1);
}
