//! Hostile images: real images made by qemu-img, mutated at random (header fields set to edge values,
//! bytes flipped, files truncated), then opened, read and written through the engine. Every outcome
//! is allowed except a panic, a hang, or a huge allocation. Each iteration is reproducible from its
//! seed. Formats join automatically once they are registered.

mod common;
use common::*;
use imgfs::host::SplitMix64;
use imgfs::image::{Image, OpenOpts};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ITERATIONS: u64 = 600;

/// Build the seed images of a format (several variants), or None when imgfs lacks the format.
fn seed_images(fmt: &str, dir: &Path) -> Option<Vec<Vec<u8>>> {
    imgfs::formats::by_name(fmt).ok()?;
    let data = write_file(dir, "data.bin", &random_bytes(1, 256 << 10));
    let d = data.to_str().unwrap().to_string();
    let mut out = Vec::new();
    let variants: Vec<Vec<&str>> = match fmt {
        "qcow2" => vec![
            vec!["-o", "cluster_size=4096"],
            vec!["-o", "cluster_size=65536,lazy_refcounts=on"],
            vec!["-o", "compat=0.10,cluster_size=512"],
            vec!["-o", "extended_l2=on,cluster_size=65536"],
        ],
        "qed" => vec![vec!["-o", "cluster_size=4096"], vec!["-o", "table_size=2"]],
        "vhdx" => vec![
            vec!["-o", "block_size=1M"],
            vec!["-o", "block_size=8M,subformat=dynamic"],
        ],
        "qcow" => vec![vec![]],
        "vpc" => vec![
            vec!["-o", "subformat=dynamic"],
            vec!["-o", "subformat=fixed,force_size=on"],
        ],
        "vdi" => vec![vec![], vec!["-o", "static=on"]],
        _ => return None,
    };
    for (i, v) in variants.iter().enumerate() {
        let p = dir.join(format!("seed{i}.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend(v.iter().copied());
        args.push(p.to_str().unwrap());
        args.push("4M");
        qemu_img(&args);
        qemu_io(
            fmt,
            &p,
            &[
                &format!("write -s {d} 65536 262144"),
                "write -P 7 2M 4096",
                "write -z 3M 65536",
            ],
        );
        if fmt == "qcow2" && i == 1 {
            qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
            qemu_io(fmt, &p, &["write -P 9 0 8192"]);
        }
        out.push(std::fs::read(&p).unwrap());
    }
    // Differencing children of the first seed (parent locators, parent UUIDs), which stays in
    // the directory the mutants are written to.
    let child = dir.join(format!("child.{fmt}"));
    let parent = dir.join(format!("seed0.{fmt}"));
    if fmt == "vpc" {
        ok(
            IMGFS,
            &[
                "create",
                "-f",
                "vpc",
                "-b",
                "seed0.vpc",
                child.to_str().unwrap(),
            ],
        );
        qemu_io_free_write(&child);
        out.push(std::fs::read(&child).unwrap());
    } else if fmt == "vdi" {
        vdi_differencing_child(&parent, &child);
        out.push(std::fs::read(&child).unwrap());
    }
    Some(out)
}

const EDGE: [u64; 10] = [
    0,
    1,
    0x200,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 40,
    1 << 62,
    u64::MAX,
    0x8000_0000_0000_0000,
];

/// `field_span`: where header fields live (the first KiB for qcow/qcow2/QED; VHDX spreads its
/// headers, region tables, metadata, BAT and log over the first few MiB).
fn mutate(rng: &mut SplitMix64, mut b: Vec<u8>, field_span: u64) -> Vec<u8> {
    for _ in 0..1 + rng.below(6) {
        let len = b.len() as u64;
        if len < 16 {
            break;
        }
        let hot = len.min(field_span.max(128 << 10));
        match rng.below(10) {
            0..=3 => {
                // An aligned header/table field set to an edge value, big- or little-endian.
                let at = rng.below(len.min(field_span).max(8) - 7) & !3;
                let v = match rng.below(3) {
                    0 => EDGE[rng.below(EDGE.len() as u64) as usize],
                    1 => len + rng.below(1 << 20),
                    _ => rng.next_u64(),
                };
                let bytes = if rng.below(2) == 0 {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let n = if rng.below(2) == 0 { 8 } else { 4 };
                let at = at as usize;
                if at + n <= b.len() {
                    b[at..at + n].copy_from_slice(&bytes[8 - n..]);
                }
            }
            4..=7 => {
                let span = if rng.below(4) == 0 { len } else { hot };
                let at = rng.below(span) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            8 => {
                let at = rng.below(hot) as usize & !7;
                if at + 8 <= b.len() {
                    b[at..at + 8].copy_from_slice(&rng.next_u64().to_be_bytes());
                }
            }
            _ => b.truncate(rng.below(len) as usize),
        }
    }
    b
}

/// Re-seal the CRC-32C of both VHDX headers and region tables so that mutations get past the
/// checksums into the metadata, BAT and log parsers.
fn fix_vhdx_checksums(data: &mut [u8]) {
    for (off, len) in [
        (64usize << 10, 4096usize),
        (128 << 10, 4096),
        (192 << 10, 65536),
        (256 << 10, 65536),
    ] {
        if data.len() >= off + len {
            data[off + 4..off + 8].fill(0);
            let crc = crc32c::crc32c(&data[off..off + len]);
            data[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Some sectors written into a differencing VHD (QEMU cannot open it), through imgfs.
fn qemu_io_free_write(child: &Path) {
    let img = Image::open(child, &OpenOpts::default()).unwrap();
    img.write_at(&[5; 5000], 3 << 20).unwrap();
    img.write_at(&[6; 512], 100 * 512).unwrap();
    img.close().unwrap();
}

/// Re-seal the VHD footer copies (offset 0 and the last 512 bytes) and the dynamic header
/// (offset 512) so mutations reach the BAT, bitmaps and locators.
fn fix_vpc_checksums(data: &mut [u8]) {
    let len = data.len();
    let spans = [
        (0usize, 512usize, 64usize),
        (512, 1024, 36),
        (len.saturating_sub(512), 512, 64),
    ];
    for (off, n, at) in spans {
        if len >= off + n && len >= 1536 {
            data[off + at..off + at + 4].fill(0);
            let sum = data[off..off + n]
                .iter()
                .fold(0u32, |s, &x| s.wrapping_add(x as u32));
            data[off + at..off + at + 4].copy_from_slice(&(!sum).to_be_bytes());
        }
    }
}

/// Open, read and write what we can; errors are fine, panics are not.
fn exercise(path: &Path, fmt: &str, rng: &mut SplitMix64) -> bool {
    let read_only = rng.below(2) == 0;
    let opts = OpenOpts {
        format: Some(fmt.to_string()),
        read_only,
        lock: false,
        cache_size: 64 << 10,
        ..OpenOpts::default()
    };
    let Ok(img) = Image::open(path, &opts) else {
        return false;
    };
    let size = img.size();
    if size == 0 {
        return true;
    }
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..24 {
        let n = 1 + rng.below(buf.len() as u64).min(size);
        let off = match i {
            0 => 0,
            1 => size - n,
            _ => rng.below(size - n + 1),
        };
        let _ = img.read_at(&mut buf[..n as usize], off);
    }
    let _ = img.seek_data(rng.below(size));
    if !read_only {
        for _ in 0..4 {
            let n = 1 + rng.below(65536).min(size - 1);
            let off = rng.below(size - n + 1);
            rng.fill(&mut buf[..n as usize]);
            let _ = img.write_at(&buf[..n as usize], off);
        }
        let n = rng.below(1 << 20).min(size);
        let _ = img.write_zeroes(rng.below(size - n + 1), n, true);
        let _ = img.flush();
    }
    let _ = img.close();
    true
}

fn fuzz_format(fmt: &str) {
    let t = tmpdir();
    let Some(seeds) = seed_images(fmt, t.path()) else {
        eprintln!("{fmt}: not registered yet; skipped");
        return;
    };
    // A hang is a failure too: abort with the seed rather than stall the suite.
    let current = Arc::new(AtomicU64::new(u64::MAX));
    let started = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    {
        let (current, started) = (current.clone(), started.clone());
        let fmt = fmt.to_string();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let s = current.load(Ordering::SeqCst);
            if s != u64::MAX && epoch.elapsed().as_secs() - started.load(Ordering::SeqCst) > 60 {
                eprintln!("{fmt}: seed {s} hangs (over 60 s)");
                std::process::abort();
            }
        });
    }
    let path = t.path().join(format!("fuzz.{fmt}"));
    let mut opened = 0;
    for seed in 0..ITERATIONS {
        let mut rng = SplitMix64::new(seed * 7919 + fmt.len() as u64);
        let base = seeds[(seed % seeds.len() as u64) as usize].clone();
        let span = match fmt {
            "vhdx" => 4 << 20,
            "vpc" => 4096,
            _ => 1024,
        };
        let mut bytes = mutate(&mut rng, base, span);
        if fmt == "vpc" && rng.below(2) == 0 && bytes.len() >= 512 {
            // The footer of a fixed disk is the last 512 bytes.
            let at = bytes.len() - 512 + (rng.below(128) as usize) * 4;
            bytes[at..at + 4].copy_from_slice(&(EDGE[rng.below(10) as usize] as u32).to_be_bytes());
        }
        if fmt == "vhdx" && rng.below(4) != 0 {
            fix_vhdx_checksums(&mut bytes);
        }
        if fmt == "vpc" && rng.below(4) != 0 {
            fix_vpc_checksums(&mut bytes);
        }
        std::fs::write(&path, &bytes).unwrap();
        current.store(seed, Ordering::SeqCst);
        started.store(epoch.elapsed().as_secs(), Ordering::SeqCst);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exercise(&path, fmt, &mut rng)
        }));
        opened += u64::from(r.as_ref().is_ok_and(|o| *o));
        if r.is_err() {
            let keep = std::env::temp_dir().join(format!("imgfs-fuzz-crash-{fmt}-{seed}"));
            std::fs::write(&keep, &bytes).unwrap();
            panic!(
                "{fmt}: seed {seed} panicked; input saved to {}",
                keep.display()
            );
        }
    }
    current.store(u64::MAX, Ordering::SeqCst);
    eprintln!("{fmt}: {ITERATIONS} mutated images survived ({opened} opened and exercised)");
    assert!(
        opened > ITERATIONS / 10,
        "{fmt}: too few mutants open; the fuzz is not reaching the tables"
    );
}

#[test]
fn hostile_qcow2() {
    fuzz_format("qcow2");
}

#[test]
fn hostile_qed() {
    fuzz_format("qed");
}

#[test]
fn hostile_qcow() {
    fuzz_format("qcow");
}

#[test]
fn hostile_vhdx() {
    fuzz_format("vhdx");
}

/// Re-seal a GPT header's entry-array and header CRCs so mutations reach the entry parser.
fn reseal_gpt(d: &mut [u8], lba: usize) {
    let h = lba * 512;
    if d.len() < h + 512 || &d[h..h + 8] != b"EFI PART" {
        return;
    }
    let u32_at = |d: &[u8], o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap());
    let entries_lba = u64::from_le_bytes(d[h + 72..h + 80].try_into().unwrap());
    let array_len = u32_at(d, h + 80) as u64 * u32_at(d, h + 84) as u64;
    let start = entries_lba.saturating_mul(512);
    if array_len <= 4 << 20 && start.saturating_add(array_len) <= d.len() as u64 {
        let crc = crc32fast::hash(&d[start as usize..(start + array_len) as usize]);
        d[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
    }
    let size = (u32_at(d, h + 12) as usize).clamp(92, 512);
    d[h + 16..h + 20].fill(0);
    let crc = crc32fast::hash(&d[h..h + size]);
    d[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

/// Partition tables made by sfdisk (MBR with a chain of logical partitions, GPT), mutated in their
/// first and last 64 KiB: the scanner must stay inside the disk, number at most 255 partitions,
/// and never panic or hang, whatever the tables say.
#[test]
fn hostile_partition_tables() {
    use imgfs::views::table::{scan, MemDisk, MAX_PARTITIONS};
    let t = tmpdir();
    let mut seeds = Vec::new();
    for script in [
        "label: dos\nstart=2048,size=4096,type=83\nstart=6144,size=10240,type=5\nstart=8192,size=1024\nstart=11264,size=1024\nstart=14336,size=1024\n",
        "label: gpt\nstart=2048,size=4096,name=a\nstart=6144,size=4096,name=b\nstart=10240,name=c\n",
    ] {
        let p = t.path().join("seed.img");
        let _ = std::fs::remove_file(&p);
        ok("truncate", &["-s", "8M", p.to_str().unwrap()]);
        let mut child = std::process::Command::new("sfdisk")
            .args(["-q", p.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn_child()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        seeds.push(std::fs::read(&p).unwrap());
    }
    let start = Instant::now();
    let mut found = 0;
    for seed in 0..ITERATIONS {
        let mut rng = SplitMix64::new(seed * 104729 + 17);
        let mut d = seeds[(seed % 2) as usize].clone();
        let len = d.len();
        if rng.below(3) == 0 {
            // The backup GPT and the end of the disk.
            let tail = d.split_off(len - (64 << 10));
            let mut tail = mutate(&mut rng, tail, 64 << 10);
            tail.resize(64 << 10, 0);
            d.extend_from_slice(&tail);
        } else {
            let head: Vec<u8> = d.drain(..64 << 10).collect();
            let mut head = mutate(&mut rng, head, 64 << 10);
            head.resize(64 << 10, 0);
            d.splice(0..0, head);
        }
        if rng.below(8) == 0 {
            d.truncate(rng.below(len as u64) as usize);
        }
        if rng.below(4) != 0 {
            reseal_gpt(&mut d, 1);
            let last = d.len() / 512;
            reseal_gpt(&mut d, last.saturating_sub(1));
        }
        for sector in [512, 4096] {
            let r = std::panic::catch_unwind(|| scan(&MemDisk(&d), sector));
            let Ok(r) = r else {
                let keep = std::env::temp_dir().join(format!("imgfs-fuzz-crash-ptable-{seed}"));
                std::fs::write(&keep, &d).unwrap();
                panic!(
                    "partition table seed {seed} panicked; saved to {}",
                    keep.display()
                );
            };
            let Some(table) = r.unwrap() else { continue };
            found += 1;
            let mut numbers = std::collections::HashSet::new();
            for p in &table.partitions {
                assert!(
                    p.len > 0 && p.start + p.len <= d.len() as u64,
                    "seed {seed}: {p:?}"
                );
                assert!(
                    p.number >= 1 && p.number <= MAX_PARTITIONS,
                    "seed {seed}: {p:?}"
                );
                assert!(
                    numbers.insert(p.number),
                    "seed {seed}: number {} twice",
                    p.number
                );
            }
        }
    }
    eprintln!(
        "partition tables: {ITERATIONS} mutants, {found} scans found a table, {:?}",
        start.elapsed()
    );
    assert!(
        found > ITERATIONS / 2,
        "the mutations never reach the entries"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "partition scans too slow"
    );
}

#[test]
fn hostile_vpc() {
    fuzz_format("vpc");
}

#[test]
fn hostile_vdi() {
    fuzz_format("vdi");
}
