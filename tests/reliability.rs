//! kill -9 of a real mounted daemon in the middle of a write workload: afterwards the image is not
//! corrupt (qemu-img check), the next mount cleans up the dead mountpoint, and every write that was
//! fsync'd before the kill reads back.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

const BLOCK: usize = 64 << 10;
/// Blocks land at scattered offsets so every format allocates as it goes.
const STRIDE: u64 = 3 * (BLOCK as u64) + 4096 + 512;

fn block(i: u64) -> Vec<u8> {
    random_bytes(0x5eed_0000 + i, BLOCK)
}

/// One run: write blocks (fsync every 4), kill -9 the daemon after `kill_after_ms`, verify.
fn kill_run(fmt: &str, img: &Path, mnt: &Path, kill_after_ms: u64, run: u64) -> i64 {
    let m = Mount::new(&[img], mnt, &[]);
    let pid = m.pid();
    let name = format!("{}.raw", img.file_stem().unwrap().to_string_lossy());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.file(&name))
        .unwrap();
    let size = file.metadata().unwrap().len();
    let nblocks = (size - BLOCK as u64) / STRIDE;
    let synced = Arc::new(AtomicI64::new(-1));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (synced, stop) = (synced.clone(), stop.clone());
        std::thread::spawn(move || {
            for i in 0..nblocks {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if file
                    .write_all_at(&block(i + run * 1000), i * STRIDE)
                    .is_err()
                {
                    break;
                }
                if i % 4 == 3 {
                    if file.sync_all().is_err() {
                        break;
                    }
                    synced.store(i as i64, Ordering::SeqCst);
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(kill_after_ms));
    ok("kill", &["-KILL", &pid.to_string()]);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(wait_until(10, || !process_alive(pid)));
    let durable = synced.load(Ordering::SeqCst);
    if run.is_multiple_of(2) {
        // `imgfs umount` recognises the dead daemon and removes the stale mount...
        let (ok, msg) = m.umount();
        assert!(
            ok && msg.contains("stale"),
            "imgfs umount after kill -9: {msg}"
        );
    } else {
        // ...and otherwise the next mount on the same mountpoint clears it.
        std::mem::forget(m);
    }

    let mut qemu_replayed = None;
    if fmt == "vhdx" {
        // QEMU only opens a VHDX with a dirty log to replay it: do that on a copy, and later
        // compare with imgfs's own replay of the original.
        let copy = img.with_extension("replayed");
        std::fs::copy(img, &copy).unwrap();
        common::qemu_repair(
            "vhdx",
            &copy,
            false,
            &format!("vhdx run {run} after kill -9"),
        );
        qemu_replayed = Some(qemu_raw(&copy));
    } else if fmt == "vpc" {
        // QEMU cannot check vpc (exit 63): imgfs's own check may find a leak (a kill inside an
        // allocation leaves the block before the footer unreferenced), nothing worse; its repair
        // must leave the image clean.
        let p = img.to_str().unwrap();
        let out = common::run(IMGFS, &["check", "-f", "vpc", p]);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(3),
            "vpc run {run}: imgfs check after kill -9: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        if code == Some(3) {
            common::ok(IMGFS, &["check", "-r", "all", "-f", "vpc", p]);
            common::ok(IMGFS, &["check", "-f", "vpc", p]);
        }
    } else if fmt != "raw" && fmt != "qcow" {
        if fmt == "vdi" {
            // A kill between the block map and the header write leaves the allocated count
            // short by design; imgfs's repair (or next read-write open) rewrites it.
            let out = common::run(IMGFS, &["check", "-r", "all", img.to_str().unwrap()]);
            assert!(out.status.success(), "vdi run {run}: imgfs check -r all");
        }
        let (code, out) = qemu_check(fmt, img);
        assert!(
            code == 0 || code == 3,
            "{fmt} run {run}: qemu-img check after kill -9: {out}"
        );
    }
    let m = Mount::new(&[img], mnt, &["--read-only"]);
    let f = m.file(&name);
    if let Some(q) = qemu_replayed {
        assert_same(
            &std::fs::read(&f).unwrap(),
            &q,
            "vhdx: imgfs's replay vs QEMU's",
        );
    }
    for i in 0..=durable {
        let got = pread(&f, i as u64 * STRIDE, BLOCK);
        assert!(
            got == block(i as u64 + run * 1000),
            "{fmt} run {run}: block {i} was fsync'd before kill -9 but did not survive (synced up to {durable})"
        );
    }
    drop(m);
    durable
}

fn kill_many(fmt: &str, runs: u64) {
    let runs = std::env::var("IMGFS_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(runs);
    let t = tmpdir();
    let img = t.path().join(format!("k.{fmt}"));
    match fmt {
        "raw" => ok("truncate", &["-s", "64M", img.to_str().unwrap()]),
        _ => qemu_img(&["create", "-q", "-f", fmt, img.to_str().unwrap(), "64M"]),
    };
    let mnt = t.path().join("mnt");
    let _guard = MountGuard(mnt.clone());
    let mut synced_blocks = 0;
    for run in 0..runs {
        synced_blocks += 1 + kill_run(fmt, &img, &mnt, 30 + (run * 37) % 150, run);
    }
    eprintln!("{fmt}: {runs} kill -9 runs, {synced_blocks} fsync'd blocks verified");
    assert!(
        synced_blocks > 0,
        "the workload never reached an fsync before the kill"
    );
}

#[test]
fn kill9_raw() {
    kill_many("raw", 5);
}

#[test]
fn kill9_qcow2() {
    kill_many("qcow2", 5);
}

/// Point the L2 entry of guest cluster `index` of a fresh 64 KiB-cluster qcow2 past the end of
/// the file (a corruption QEMU would also refuse to follow).
fn corrupt_qcow2_l2_entry(img: &Path, index: u64) {
    let bytes = std::fs::read(img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l1_offset = be64(40) as usize;
    let l2_offset = (be64(l1_offset) & 0x00ff_ffff_ffff_fe00) as usize;
    assert!(l2_offset > 0, "cluster 0 must be allocated");
    let bad = (1u64 << 63) | (1u64 << 40); // OFLAG_COPIED | 1 TiB: far past the end
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&bad.to_be_bytes(), (l2_offset + 8 * index as usize) as u64)
        .unwrap();
}

#[test]
fn corrupt_table_fails_only_its_range_and_degrades_only_its_image() {
    let t = tmpdir();
    let bad = t.path().join("bad.qcow2");
    let good = t.path().join("good.qcow2");
    for p in [&bad, &good] {
        qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "8M"]);
        qemu_io("qcow2", p, &["write -P 0x5a 0 1M"]);
    }
    corrupt_qcow2_l2_entry(&bad, 3);
    let m = Mount::new(&[&bad, &good], &t.path().join("mnt"), &[]);
    let b = m.file("bad.raw");
    // The corrupt cluster fails with EIO; its neighbours still read.
    let f = std::fs::File::open(&b).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, 3 * 65536).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    drop(f);
    assert_eq!(pread(&b, 2 * 65536, 4096), vec![0x5a; 4096]);
    assert_eq!(pread(&b, 4 * 65536, 4096), vec![0x5a; 4096]);
    // That image is now read-only, and says so; the other keeps taking writes.
    let state = ok(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.imgfs.state",
            b.to_str().unwrap(),
        ],
    );
    assert_eq!(state, "degraded");
    let e = pwrite(&b, 0, b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    pwrite(&m.file("good.raw"), 4096, b"still fine").unwrap();
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    assert_check_clean("qcow2", &good);
    // imgfs info still describes the damaged image.
    let info = ok(IMGFS, &["info", bad.to_str().unwrap()]);
    assert!(info.contains("qcow2"), "{info}");
}

#[test]
fn kill9_qed() {
    kill_many("qed", 5);
}

#[test]
fn kill9_qcow() {
    kill_many("qcow", 5);
}

#[test]
fn kill9_vhdx() {
    kill_many("vhdx", 5);
}

#[test]
fn kill9_vpc() {
    kill_many("vpc", 5);
}

#[test]
fn kill9_vdi() {
    kill_many("vdi", 5);
}

#[test]
fn kill9_vmdk() {
    kill_many("vmdk", 5);
}
