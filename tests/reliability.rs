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

    if fmt != "raw" && fmt != "qcow" {
        let (code, out) = qemu_check(fmt, img);
        assert!(
            code == 0 || code == 3,
            "{fmt} run {run}: qemu-img check after kill -9: {out}"
        );
    }
    let m = Mount::new(&[img], mnt, &["--read-only"]);
    let f = m.file(&name);
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
