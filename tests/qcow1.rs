//! qcow (version 1) end to end: images made by qemu-img/qemu-io (plain, with a backing file,
//! compressed by `qemu-img convert -c`) read back byte-identical to `qemu-img convert -O raw`;
//! writes through the engine (holes, backed clusters, compressed clusters) then
//! `qemu-img compare` identical (qemu-img check does not support qcow); hostile headers; imgfs
//! created images; power cuts.

mod common;
use common::*;
use imgfs::crashsim::Workload;
use imgfs::{formats, host::HostFile, Image, OpenOpts};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn ro() -> OpenOpts {
    open_opts(true)
}
fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Compressible and incompressible 4 KiB clusters, and zero ones.
fn mixed_content(seed: u64, len: usize) -> Vec<u8> {
    let rnd = random_bytes(seed, len);
    let mut v = vec![0u8; len];
    for (i, c) in v.chunks_mut(4096).enumerate() {
        let r = &rnd[i * 4096..i * 4096 + c.len()];
        match i % 4 {
            0 => c.copy_from_slice(r),
            1 => c.fill(r[0]),
            2 => {
                for (j, b) in c.iter_mut().enumerate() {
                    *b = r[j % 37];
                }
            }
            _ => {}
        }
    }
    v
}

/// Apply writes through the engine and to `want`, close, compare with qemu-img and reopen.
fn write_and_verify(img: &Path, want: &mut [u8], writes: &[(u64, usize, u64)]) {
    {
        let image = Image::open(img, &OpenOpts::default()).unwrap();
        for &(off, len, seed) in writes {
            let b = random_bytes(seed, len);
            image.write_at(&b, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&b);
        }
        assert_same(&engine_read_all(&image), want, "before close");
        image.close().unwrap();
    }
    assert_compare_bytes("qcow", img, want);
    qemu_img(&["info", "-f", "qcow", p(img)]);
    let image = Image::open(img, &ro()).unwrap();
    assert_same(&engine_read_all(&image), want, "reopen");
}

const WRITES: &[(u64, usize, u64)] = &[
    (100, 5000, 1),
    (3 * MIB + 3, 200_000, 2),
    (MIB - 10, 20, 3),
    (8 * MIB - 100, 100, 4),
    (5 * MIB, 1 << 20, 5),
    (2 * MIB + 4095, 2, 6),
];

#[test]
fn plain_images_read_and_write() {
    let dir = tmpdir();
    let t = TestImage::build(dir.path(), "a.qcow", "qcow")
        .size("8M")
        .qemu();
    t.write_random(
        7,
        300_000,
        &[(0, 300_000), (1_000_000, 123_457), (8 * MIB - 65536, 65536)],
    );
    let img = t.path.clone();
    let mut want = qemu_raw(&img);
    let image = Image::open(&img, &ro()).unwrap();
    assert_eq!(image.format(), "qcow");
    assert_eq!(image.size(), 8 * MIB);
    assert_same(&engine_read_all(&image), &want, "qemu-made qcow");
    drop(image);
    write_and_verify(&img, &mut want, WRITES);
    // Zeroing without a backing file deallocates.
    let image = Image::open(&img, &OpenOpts::default()).unwrap();
    image.write_zeroes(4096, 3 * MIB, true).unwrap();
    image.write_zeroes(7 * MIB + 1, 5000, false).unwrap();
    want[4096..4096 + 3 * MIB as usize].fill(0);
    want[7 * MIB as usize + 1..7 * MIB as usize + 5001].fill(0);
    image.close().unwrap();
    drop(image);
    assert_compare_bytes("qcow", &img, &want);
}

#[test]
fn backing_file_reads_and_cow() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, random_bytes(3, 8 * MIB as usize)).unwrap();
    let t = TestImage::build(dir.path(), "o.qcow", "qcow")
        .backing("base.raw", Some("raw"))
        .qemu();
    t.io(&["write -P 9 1M 4k", "write -P 8 2000 3000"]);
    let img = t.path.clone();
    let image = Image::open(&img, &ro()).unwrap();
    assert_eq!(image.info().backing.unwrap().name, "base.raw");
    let mut want = qemu_raw(&img);
    assert_same(&engine_read_all(&image), &want, "overlay");
    drop(image);
    let before = std::fs::read(&base).unwrap();
    write_and_verify(&img, &mut want, WRITES);
    assert!(std::fs::read(&base).unwrap() == before);
    // With a backing file zeroing writes zero bytes.
    let image = Image::open(&img, &OpenOpts::default()).unwrap();
    image.write_zeroes(0, 64 << 10, true).unwrap();
    want[..64 << 10].fill(0);
    assert_same(&engine_read_all(&image), &want, "zeroed over backing");
    image.close().unwrap();
}

#[test]
fn compressed_clusters_read_and_copy_out() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, mixed_content(11, 8 * MIB as usize)).unwrap();
    let img = dir.path().join("c.qcow");
    // May exit 1 without a message although the output is complete: compare decides.
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow", p(&src), p(&img)],
    );
    assert_compare("qcow", &img, &src);
    let map = qemu_img(&["map", "--output=json", "-f", "qcow", p(&img)]);
    assert!(
        map.contains("\"compressed\": true"),
        "no compressed clusters: {map}"
    );
    let mut want = std::fs::read(&src).unwrap();
    let image = Image::open(&img, &ro()).unwrap();
    assert_same(&engine_read_all(&image), &want, "compressed read");
    let mut buf = vec![0u8; 10_000];
    image.read_at(&mut buf, 4096 + 17).unwrap();
    assert_same(
        &buf,
        &want[4096 + 17..4096 + 10_017],
        "unaligned compressed read",
    );
    drop(image);
    // Partial writes into compressed clusters copy them out first.
    write_and_verify(
        &img,
        &mut want,
        &[
            (4096 + 100, 10, 1),
            (2 * 4096 + 4000, 200, 2),
            (MIB + 4096, 4096, 3),
        ],
    );
    write_and_verify(&img, &mut want, WRITES);
}

#[test]
fn hostile_headers_are_errors() {
    let dir = tmpdir();
    let bytes = TestImage::build(dir.path(), "good.qcow", "qcow")
        .size("8M")
        .qemu()
        .bytes();
    let cases: &[(usize, &[u8], &str)] = &[
        (4, &2u32.to_be_bytes(), ""), // version 2 = qcow2: not ours
        (32, &[8], "cluster_bits"),
        (33, &[14], "l2_bits"),
        (36, &1u32.to_be_bytes(), "AES"),
        (36, &7u32.to_be_bytes(), "encryption"),
        (24, &1u64.to_be_bytes(), "size"),
        (24, &(1u64 << 40).to_be_bytes(), "L1"),
        (40, &(1u64 << 60).to_be_bytes(), "L1"),
        (8, &48u64.to_be_bytes(), ""), // backing name of 0 bytes: fine...
        (16, &5000u32.to_be_bytes(), "backing"), // ...but not 5000
    ];
    for (i, (off, val, needle)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("h{i}.qcow"));
        let mut b = bytes.clone();
        b[*off..*off + val.len()].copy_from_slice(val);
        if i == cases.len() - 1 {
            b[8..16].copy_from_slice(&48u64.to_be_bytes());
        }
        std::fs::write(&img, &b).unwrap();
        let r = Image::open(
            &img,
            &OpenOpts {
                format: Some("qcow".into()),
                ..ro()
            },
        );
        if i == 8 {
            assert!(r.is_ok(), "empty backing name means none");
            continue;
        }
        let e = r.expect_err(&format!("case {i}"));
        assert!(e.to_string().contains(needle), "case {i}: {e}");
    }
    // A qcow2 image is not probed as qcow.
    let head = TestImage::build(dir.path(), "x.qcow2", "qcow2")
        .size("1M")
        .qemu()
        .bytes();
    assert_ne!(formats::probe(&head[..4096]).name(), "qcow");
    assert_eq!(formats::probe(&bytes).name(), "qcow");
    // L2 entries pointing past the end of the file are errors at read time.
    let img = dir.path().join("l2.qcow");
    std::fs::write(&img, &bytes).unwrap();
    qemu_io("qcow", &img, &["write -P 1 0 4k"]);
    let mut f = std::fs::read(&img).unwrap();
    let l2 = u64::from_be_bytes(f[48..56].try_into().unwrap()) as usize;
    f[l2..l2 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    f[l2 + 8..l2 + 16].copy_from_slice(&(u64::MAX).to_be_bytes()); // compressed, bogus
    std::fs::write(&img, &f).unwrap();
    let image = Image::open(&img, &ro()).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(image.read_at(&mut buf, 0).is_err());
    assert!(image.read_at(&mut buf, 4096).is_err());
}

#[test]
fn created_images_work_with_qemu() {
    let dir = tmpdir();
    let base = dir.path().join("b.raw");
    std::fs::write(&base, random_bytes(5, 8 * MIB as usize)).unwrap();
    for (i, backing) in [false, true].into_iter().enumerate() {
        let mut spec = TestImage::build(dir.path(), &format!("c{i}.qcow"), "qcow").size(8 * MIB);
        if backing {
            spec = spec.backing("b.raw", Some("raw"));
        }
        let img = spec.imgfs().path;
        let info = qemu_img(&["info", "-f", "qcow", p(&img)]);
        assert!(info.contains("virtual size: 8 MiB"), "{info}");
        let mut want = qemu_raw(&img);
        if backing {
            assert_same(
                &want,
                &std::fs::read(&base).unwrap(),
                "backing shows through",
            );
        }
        write_and_verify(&img, &mut want, WRITES);
    }
}

#[test]
fn crash_safety() {
    let dir = tmpdir();
    let t = TestImage::build(dir.path(), "crash.qcow", "qcow")
        .size("2M")
        .qemu();
    t.write_random(1, 65536, &[(512 << 10, 65536)]);
    let work = Workload {
        ops: 40,
        max_write: 96 << 10,
        ..Workload::default()
    };
    t.crash_loop(0..60, &work, 20, |_, crashed| {
        qemu_io("qcow", crashed, &["read 0 2M"])
    });
}

/// Power cuts over an overlay (512-byte clusters, as qemu-img makes them with a backing file):
/// backing data copied into partially written clusters must survive.
#[test]
fn crash_safety_over_backing() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, random_bytes(78, 2 * MIB as usize)).unwrap();
    let t = TestImage::build(dir.path(), "over.qcow", "qcow")
        .backing("base.raw", Some("raw"))
        .size("2M")
        .qemu();
    let work = Workload {
        ops: 30,
        max_write: 20 << 10,
        ..Workload::default()
    };
    t.crash_loop(0..60, &work, 0, |_, _| {});
}

/// Garbage tables behind a valid header: every read either succeeds or fails cleanly.
#[test]
fn garbage_tables_never_panic() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, mixed_content(2, 2 * MIB as usize)).unwrap();
    let img = dir.path().join("g.qcow");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow", p(&src), p(&img)],
    );
    let clean = std::fs::read(&img).unwrap();
    let mut rng = imgfs::host::SplitMix64::new(6);
    for seed in 0..40u64 {
        let mut b = clean.clone();
        for _ in 0..1 + rng.below(30) {
            let at = (48 + rng.below(b.len() as u64 - 48 - 8) as usize) & !7;
            let v = match rng.below(4) {
                0 => rng.next_u64(),
                1 => rng.below(b.len() as u64 * 2),
                2 => (1 << 63) | rng.below(1 << 62),
                _ => rng.below(64) * 4096,
            };
            b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        exercise_damaged(&b, &img, "qcow", 2 * MIB, 64 << 10, seed, seed * 40_000);
    }
}

/// Power cuts with a two-table L2 cache over a backing file: L2 tables written back on eviction
/// must only point at clusters whose copy-on-write fill is durable, and L1 entries only at
/// durable L2 tables.
#[test]
fn crash_safety_with_evictions() {
    let dir = tmpdir();
    let size = 16 * MIB as usize;
    let base = dir.path().join("base.raw");
    std::fs::write(&base, random_bytes(321, size)).unwrap();
    let t = TestImage::build(dir.path(), "ev.qcow", "qcow")
        .backing("base.raw", Some("raw"))
        .qemu();
    let work = eviction_workload();
    let evictions = t.crash_loop(0..150, &work, 30, |_, c| {
        qemu_io("qcow", c, &["read 0 16M"])
    });
    assert!(evictions > 100, "only {evictions} evictions");
}

/// imgfs's own qcow check (qemu-img has none): clean on QEMU's images, finds and clears bad
/// entries.
#[test]
fn check_finds_and_repairs_bad_entries() {
    use imgfs::image::Repair;
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, mixed_content(9, 2 * MIB as usize)).unwrap();
    let img = dir.path().join("k.qcow");
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow", p(&src), p(&img)],
    );
    assert_compare("qcow", &img, &src);
    let qcow = formats::by_name("qcow").unwrap();
    let r = qcow
        .check(HostFile::open(&img, false).unwrap(), Repair::None)
        .unwrap();
    assert_eq!((r.corruptions, r.exit_code()), (0, 0), "{:?}", r.messages);
    assert!(r.allocated_clusters > 300, "{}", r.allocated_clusters);
    let mut f = std::fs::read(&img).unwrap();
    let l2 = u64::from_be_bytes(f[48..56].try_into().unwrap()) as usize;
    f[l2..l2 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes()); // past the end
    let second: [u8; 8] = f[l2 + 4 * 8..l2 + 5 * 8].try_into().unwrap(); // an incompressible one
    f[l2 + 8 * 8..l2 + 9 * 8].copy_from_slice(&second);
    std::fs::write(&img, &f).unwrap();
    let r = qcow
        .check(HostFile::open(&img, false).unwrap(), Repair::None)
        .unwrap();
    assert_eq!((r.corruptions, r.exit_code()), (2, 2), "{:?}", r.messages);
    let r = qcow
        .check(HostFile::open(&img, true).unwrap(), Repair::All)
        .unwrap();
    assert_eq!(
        (r.corruptions, r.corruptions_fixed),
        (2, 1),
        "{:?}",
        r.messages
    );
    let image = Image::open(&img, &ro()).unwrap();
    let all = engine_read_all(&image);
    assert!(
        all[..4096].iter().all(|&b| b == 0),
        "cleared entry reads zeros"
    );
}

/// Virtual size not a multiple of the cluster size: writes at the very end.
#[test]
fn odd_size() {
    let dir = tmpdir();
    let t = TestImage::build(dir.path(), "odd.qcow", "qcow")
        .size(5243392) // 5 MiB + 512
        .qemu();
    let img = t.path.clone();
    let mut want = t.raw();
    assert_eq!(want.len(), 5 * MIB as usize + 512);
    let image = Image::open(&img, &OpenOpts::default()).unwrap();
    for (off, len, seed) in [(5 * MIB + 100, 412usize, 1u64), (5 * MIB - 10, 20, 2)] {
        let b = random_bytes(seed, len);
        image.write_at(&b, off).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&b);
    }
    image.close().unwrap();
    drop(image);
    assert_compare_bytes("qcow", &img, &want);
}
