//! Power-cut simulation shared by every format's crash tests and by `scripts/crash-bench.sh`.
//!
//! A seeded random workload (writes, zero/discard, fsync) runs through the real engine on a
//! `FaultFile`. At a random point the power is cut: the image keeps what was synced plus a random
//! subset of later writes in random order. The image must then open again, and every byte whose
//! last change was acknowledged before the last completed fsync must read back. Bytes changed after
//! that fsync may hold old or new data (or be torn), as on a real disk. With `resize_pct` the
//! workload also grows the disk; the reopened image must then have either the size before the
//! resize the cut interrupted or the size after it, and read zeros in the grown range.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::host::{FaultFile, SplitMix64};
use crate::image::{Image, OpenOpts, Preopened};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Workload {
    /// Operations before the cut (the cut falls at a random one of them).
    pub ops: usize,
    /// Largest single write.
    pub max_write: usize,
    /// Out of 100: chance that an operation is a discard/zero, and an fsync.
    pub discard_pct: u64,
    pub fsync_pct: u64,
    /// Metadata cache budget; small values force table evictions (write-back between fsyncs).
    pub cache_size: u64,
    /// Out of 100: chance that an operation grows the disk (by up to `grow_max` bytes, whole
    /// sectors, at most four times the initial size in all).
    pub resize_pct: u64,
    pub grow_max: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            ops: 60,
            max_write: 192 << 10,
            discard_pct: 10,
            fsync_pct: 12,
            cache_size: crate::image::DEFAULT_CACHE_SIZE,
            resize_pct: 0,
            grow_max: 8 << 20,
        }
    }
}

/// What one simulated cut produced.
pub struct CutResult {
    /// The host file bytes after the cut (write them out to run `qemu-img check`).
    pub image: Vec<u8>,
    /// Operations done before the cut, and how many fsyncs completed.
    pub ops_done: usize,
    pub fsyncs: usize,
    /// Metadata tables evicted from the cache (written back when dirty) before the cut.
    pub evictions: u64,
    /// Resizes that completed before the cut.
    pub resizes: usize,
    /// The other files of a multi-file image after the cut, in the order given.
    pub siblings: Vec<Vec<u8>>,
}

/// Fault files for the other files of a multi-file image (split VMDK extents), by path.
fn fault_siblings(files: &[(PathBuf, Vec<u8>)]) -> (Vec<Arc<FaultFile>>, Preopened) {
    let faults: Vec<Arc<FaultFile>> = files
        .iter()
        .map(|(_, b)| FaultFile::new(b.clone()))
        .collect();
    let map: HashMap<PathBuf, HostFile> = files
        .iter()
        .zip(&faults)
        .map(|((p, _), f)| (p.clone(), f.host_file(p, true)))
        .collect();
    (faults, Preopened(Some(Arc::new(map))))
}

/// Run one seeded workload on an image whose initial bytes are `initial`, cut the power, and check
/// the reopened image. `name` is the path the image claims (for backing-file lookups and messages).
/// Returns the crashed bytes, or an error describing the first lost byte.
pub fn run_cut(
    initial: Vec<u8>,
    name: &Path,
    format: &str,
    seed: u64,
    work: &Workload,
) -> Result<CutResult> {
    run_cut_files(initial, &[], name, format, seed, work)
}

/// `run_cut` for an image made of several files: `siblings` are the other files (canonical
/// paths as the image names them, and their initial bytes); each gets its own fault file and
/// its own cut.
pub fn run_cut_files(
    initial: Vec<u8>,
    siblings: &[(PathBuf, Vec<u8>)],
    name: &Path,
    format: &str,
    seed: u64,
    work: &Workload,
) -> Result<CutResult> {
    let mut rng = SplitMix64::new(seed);
    let fault = FaultFile::new(initial);
    let (sib_faults, preopened) = fault_siblings(siblings);
    let opts = OpenOpts {
        format: Some(format.to_string()),
        lock: false,
        cache_size: work.cache_size,
        preopened,
        ..OpenOpts::default()
    };
    let img = Image::open_host(fault.host_file(name, true), &opts)?;
    let mut size = img.size();
    let size_cap = size * 4;
    // Sizes the reopened image may have: the current one, plus the target of a resize the cut
    // interrupted.
    let mut sizes = vec![size];
    let mut resizes = 0;
    let mut model = vec![0u8; size as usize];
    img.read_at(&mut model, 0)?;
    // `durable` = guest content as of the last completed fsync; `unsure` marks bytes changed since.
    let mut durable = model.clone();
    let mut unsure = vec![false; size as usize];
    // Half the cuts fall between operations; the other half at a random host write, which may be
    // in the middle of a flush (between its syncs) or of a table write-back.
    let mut cut_at = rng.below(work.ops as u64 + 1) as usize;
    if rng.below(2) == 0 {
        let n = rng.below(work.ops as u64 * 6);
        for f in std::iter::once(&fault).chain(&sib_faults) {
            f.fail_after_writes(n);
        }
        cut_at = work.ops;
    }
    let mut fsyncs = 0;
    let mut ops_done = 0;
    let mut buf = vec![0u8; work.max_write];
    for _ in 0..cut_at {
        let roll = rng.below(100);
        if roll < work.fsync_pct {
            if img.flush().is_err() {
                break; // the power went out inside this flush: it never completed
            }
            durable.copy_from_slice(&model);
            unsure.fill(false);
            fsyncs += 1;
            ops_done += 1;
            continue;
        }
        if roll >= 100 - work.resize_pct {
            let grow = (1 + rng.below(work.grow_max.max(512))).div_ceil(512) * 512;
            let new = (size + grow).min(size_cap.max(size));
            sizes = vec![size, new];
            // A resize is a few writes among hundreds: aim half the cuts of a resizing workload
            // at one of its own writes.
            if rng.below(2) == 0 {
                fault.fail_after_writes(rng.below(6));
            }
            if img.resize(new).is_err() {
                break;
            }
            size = new;
            sizes = vec![size];
            for v in [&mut model, &mut durable] {
                v.resize(size as usize, 0);
            }
            unsure.resize(size as usize, false);
            resizes += 1;
            ops_done += 1;
            continue;
        }
        let (off, len) = random_range(&mut rng, size, work.max_write);
        let range = off as usize..(off + len) as usize;
        // Whatever happens to this operation, its range may now hold old or new bytes.
        unsure[range.clone()].fill(true);
        let done = if roll < work.fsync_pct + work.discard_pct {
            model[range.clone()].fill(0);
            img.write_zeroes(off, len, rng.below(2) == 0)
        } else {
            rng.fill(&mut buf[..len as usize]);
            model[range].copy_from_slice(&buf[..len as usize]);
            img.write_at(&buf[..len as usize], off)
        };
        if done.is_err() {
            break;
        }
        ops_done += 1;
    }
    let evictions = img.format_stats().cache.evictions;
    let image = fault.crash_image(&mut rng);
    let crashed: Vec<Vec<u8>> = sib_faults.iter().map(|f| f.crash_image(&mut rng)).collect();
    // The crashed bytes are taken; whatever closing `img` writes now goes to the discarded
    // in-memory file. (Forgetting it instead would leak the whole image on every cut.)
    drop(img);
    let largest = sizes.iter().copied().max().unwrap_or(size) as usize;
    durable.resize(largest, 0);
    unsure.resize(largest, false);
    let after: Vec<(PathBuf, Vec<u8>)> = siblings
        .iter()
        .zip(&crashed)
        .map(|((p, _), b)| (p.clone(), b.clone()))
        .collect();
    let want = Expected {
        durable: &durable,
        unsure: &unsure,
        sizes: &sizes,
    };
    check_after_cut(&image, &after, name, format, &want, seed)?;
    Ok(CutResult {
        siblings: crashed,
        image,
        ops_done,
        fsyncs,
        evictions,
        resizes,
    })
}

/// What a reopened image must show after a cut: one of `sizes`, and the `durable` guest bytes
/// (covering the largest size) except where `unsure` (changed since the last completed fsync).
struct Expected<'a> {
    durable: &'a [u8],
    unsure: &'a [bool],
    sizes: &'a [u64],
}

/// Reopen the crashed bytes (and siblings) read-only and read-write, and compare with `want`.
fn check_after_cut(
    image: &[u8],
    siblings: &[(PathBuf, Vec<u8>)],
    name: &Path,
    format: &str,
    want: &Expected,
    seed: u64,
) -> Result<()> {
    let Expected {
        durable,
        unsure,
        sizes,
    } = *want;
    for read_only in [true, false] {
        let fault = FaultFile::new(image.to_vec());
        let opts = OpenOpts {
            format: Some(format.to_string()),
            lock: false,
            read_only,
            preopened: fault_siblings(siblings).1,
            ..OpenOpts::default()
        };
        let img = Image::open_host(fault.host_file(name, !read_only), &opts)
            .map_err(|e| Error::corrupt(format!("seed {seed}: reopen after cut failed: {e}")))?;
        let size = img.size();
        if !sizes.contains(&size) {
            return Err(Error::corrupt(format!(
                "seed {seed}: reopened with virtual size {size}, expected one of {sizes:?} \
                 (read_only={read_only})"
            )));
        }
        let n = size as usize;
        let mut got = vec![0u8; n];
        img.read_at(&mut got, 0)?;
        if let Some(i) = first_lost_byte(&got, &durable[..n], &unsure[..n]) {
            return Err(Error::corrupt(format!(
                "seed {seed}: fsync'd byte at guest offset {i:#x} lost after cut \
                 (read {:#04x}, expected {:#04x}, read_only={read_only})",
                got[i], durable[i]
            )));
        }
        // A read-write open may repair; it must not change fsync'd content either.
        img.close()?;
    }
    Ok(())
}

/// The first byte that should have survived but differs (compared 4 KiB at a time).
fn first_lost_byte(got: &[u8], durable: &[u8], unsure: &[bool]) -> Option<usize> {
    const CHUNK: usize = 4096;
    (0..durable.len()).step_by(CHUNK).find_map(|start| {
        let end = (start + CHUNK).min(durable.len());
        if got[start..end] == durable[start..end] {
            return None;
        }
        (start..end).find(|&i| !unsure[i] && got[i] != durable[i])
    })
}

/// A random range inside the disk, often cluster-aligned, sometimes not.
fn random_range(rng: &mut SplitMix64, size: u64, max: usize) -> (u64, u64) {
    let mut len = 1 + rng.below(max as u64);
    let mut off = rng.below(size);
    if rng.below(2) == 0 {
        off &= !0xfff;
        len = (len + 0xfff) & !0xfff;
    }
    len = len.min(size - off).min(max as u64).max(1);
    (off, len.min(size - off))
}

/// Run `cuts` seeded cuts and return how many passed; the first failure is returned as an error.
pub fn run_many(
    initial: &[u8],
    name: &Path,
    format: &str,
    seeds: std::ops::Range<u64>,
    work: &Workload,
    mut each: impl FnMut(u64, &CutResult) -> Result<()>,
) -> Result<u64> {
    let mut passed = 0;
    for seed in seeds {
        let r = run_cut(initial.to_vec(), name, format, seed, work)?;
        each(seed, &r)?;
        passed += 1;
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 50 cuts of a raw 1 MiB disk growing `resize_pct` of the time; returns the resizes done.
    fn raw_cuts(resize_pct: u64) -> usize {
        let work = Workload {
            ops: 40,
            max_write: 8192,
            resize_pct,
            grow_max: 256 << 10,
            ..Workload::default()
        };
        let mut resizes = 0;
        let n = run_many(
            &vec![0u8; 1 << 20],
            Path::new("/nonexistent/raw.img"),
            "raw",
            0..50,
            &work,
            |_, r| {
                resizes += r.resizes;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 50);
        resizes
    }

    #[test]
    fn raw_survives_cuts() {
        assert_eq!(raw_cuts(0), 0);
    }

    #[test]
    fn raw_survives_cuts_while_growing() {
        let resizes = raw_cuts(10);
        assert!(resizes > 20, "only {resizes} resizes in 50 workloads");
    }

    #[test]
    fn a_lost_fsynced_write_is_detected() {
        // A FaultFile whose syncs "succeed" but keep nothing must be caught by the checker.
        let durable = vec![1u8; 16];
        let unsure = vec![false; 16];
        let want = Expected {
            durable: &durable,
            unsure: &unsure,
            sizes: &[16],
        };
        let e = check_after_cut(&[0u8; 16], &[], Path::new("x"), "raw", &want, 7).unwrap_err();
        assert!(e.to_string().contains("lost after cut"), "{e}");
    }
}
