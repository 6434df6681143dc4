//! Parallel O_DIRECT writes into disjoint pieces of the same unallocated clusters, through a real
//! mount, for every writable format. Every thread races the others to allocate each cluster (and
//! each new table); the image must end up with exactly the bytes written, stay writable (not
//! degraded by a false "corrupt entry"), and pass `qemu-img check`.
//!
//! ```text
//!  cluster c:  | t0 piece | t1 piece | t2 piece | t3 piece |   (PIECE bytes each)
//!  thread t writes its piece of cluster 0, 1, 2, ... in order, all threads at once
//! ```

mod common;
use common::*;

use std::path::Path;
use std::sync::Barrier;

/// Threads writing at once (more than the machine's cores, so they are preempted mid-call).
const THREADS: u64 = 4;
/// Bytes one thread writes into each cluster; THREADS pieces fill one 4 KiB stripe.
const PIECE: u64 = 1024;
const STRIPE: u64 = THREADS * PIECE;
/// Stripes written: 12 MB, which crosses several L2 tables (and VHDX blocks). (Not 16 MiB: for
/// a QED image filled to exactly two full 8 MiB tables, qemu-img check reports one leaked
/// cluster, even for an image QEMU itself wrote.)
const STRIPES: u64 = 3000;
const SIZE: u64 = 32 << 20;

/// Who checks the metadata afterwards.
#[derive(Clone, Copy)]
enum Check {
    /// Nothing to check (raw).
    None,
    Qemu,
    /// QEMU has no checker for this format (qcow v1): `imgfs check`.
    Imgfs,
}

/// One line per format: qemu-img format name, its `create -o` options (empty for none), checker.
/// Small clusters give the most allocations per byte written.
const FORMATS: &[(&str, &str, Check)] = &[
    ("raw", "", Check::None),
    ("qcow", "", Check::Imgfs),
    ("qcow2", "cluster_size=4096", Check::Qemu),
    ("qed", "cluster_size=4096", Check::Qemu),
    ("vhdx", "block_size=1M", Check::Qemu),
    ("vpc", "subformat=dynamic", Check::Imgfs),
    ("vdi", "", Check::Qemu),
];

/// The bytes thread `t` writes into stripe `s` (distinct for every piece, never all zero).
fn piece(t: u64, s: u64) -> Vec<u8> {
    let mut v = random_bytes(s * THREADS + t, PIECE as usize);
    v[0] = 1 + t as u8;
    v
}

/// THREADS threads released at once, thread t running `each(t, its own O_DIRECT handle)`.
fn race(file: &Path, each: impl Fn(u64, &std::fs::File) + Sync) {
    let start = Barrier::new(THREADS as usize);
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            let (start, each) = (&start, &each);
            sc.spawn(move || {
                let f = open_direct(file, true);
                start.wait();
                each(t, &f);
            });
        }
    });
}

fn run_format(dir: &Path, fmt: &str, opts: &str, check: Check) {
    let img = dir.join(format!("disk.{fmt}"));
    let size = SIZE.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img.to_str().unwrap(), size.as_str()]);
    qemu_img(&args);

    let mnt = dir.join(format!("mnt-{fmt}"));
    let m = Mount::new(&[&img], &mnt, &[]);
    let file = m.file("disk.raw");
    race(&file, |t, f| {
        for s in 0..STRIPES {
            direct_write(f, s * STRIPE + t * PIECE, &piece(t, s));
        }
    });
    let stats = ok(IMGFS, &["stats", mnt.to_str().unwrap()]);
    assert!(
        stats
            .lines()
            .next()
            .is_some_and(|l| l.contains("read-write")),
        "{fmt}: image no longer read-write after parallel writes:\n{stats}"
    );
    let (umounted, err) = m.umount();
    assert!(umounted, "{fmt}: umount failed: {err}");

    let mut want = vec![0u8; SIZE as usize];
    for s in 0..STRIPES {
        for t in 0..THREADS {
            let at = (s * STRIPE + t * PIECE) as usize;
            want[at..at + PIECE as usize].copy_from_slice(&piece(t, s));
        }
    }
    assert_compare_bytes(fmt, &img, &want);
    match check {
        Check::None => {}
        Check::Qemu => assert_check_clean(fmt, &img),
        Check::Imgfs => {
            ok(IMGFS, &["check", "-f", fmt, img.to_str().unwrap()]);
        }
    }
}

#[test]
fn parallel_writes_into_one_unallocated_cluster() {
    let dir = tmpdir();
    for &(fmt, opts, check) in FORMATS {
        run_format(dir.path(), fmt, opts, check);
    }
}

/// A differencing VHD marks sectors present in 4 KiB groups, filling a group's other sectors
/// from the parent (read before the allocation lock): four threads write every other sector of
/// the same groups at once (thread t: sector 2t of each group), so every fill races the other
/// threads' writes and fills. The odd sectors must still read as the parent's.
#[test]
fn parallel_writes_into_differencing_vhd_groups() {
    let dir = tmpdir();
    let d = dir.path();
    let parent = d.join("parent.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        parent.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let base = random_bytes(77, 16 << 20);
    let seed = write_file(d, "seed.bin", &base);
    qemu_io(
        "vpc",
        &parent,
        &[&format!("write -s {} 0 {}", seed.display(), base.len())],
    );
    let child = d.join("child.vhd");
    ok(
        IMGFS,
        &[
            "create",
            "-f",
            "vpc",
            "-b",
            "parent.vhd",
            child.to_str().unwrap(),
        ],
    );
    let mut want = base.clone();
    want.resize(SIZE as usize, 0);
    const SEC: u64 = 512;
    let groups = STRIPES;
    let mnt = d.join("mnt-vpc-diff");
    let m = Mount::new(&[&child], &mnt, &[]);
    let file = m.file("child.raw");
    let sector = |t: u64, g: u64| random_bytes(1_000_000 + g * THREADS + t, SEC as usize);
    race(&file, |t, f| {
        for g in 0..groups {
            direct_write(f, g * 4096 + 2 * t * SEC, &sector(t, g));
        }
    });
    let (umounted, err) = m.umount();
    assert!(umounted, "vpc-diff: umount failed: {err}");
    for g in 0..groups {
        for t in 0..THREADS {
            let at = (g * 4096 + 2 * t * SEC) as usize;
            want[at..at + SEC as usize].copy_from_slice(&sector(t, g));
        }
    }
    let img = imgfs::Image::open(
        &child,
        &imgfs::OpenOpts {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_same(
        &engine_read_all(&img),
        &want,
        "differencing VHD after parallel writes",
    );
    ok(IMGFS, &["check", "-f", "vpc", child.to_str().unwrap()]);
}
