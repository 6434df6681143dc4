//! qcow2 end to end: images made by qemu-img/qemu-io across the option space, read through the
//! engine and compared with `qemu-img convert -O raw`; writes through the engine, then
//! `qemu-img check` clean, `qemu-img compare` identical and a reopen reads the same.

mod common;

use common::*;
use imgfs::image::{Format, Repair};
use imgfs::{Image, OpenOpts};
use std::path::{Path, PathBuf};

fn open(p: &Path, read_only: bool) -> Image {
    let opts = OpenOpts {
        read_only,
        ..OpenOpts::default()
    };
    Image::open(p, &opts).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// `qemu-img create -f qcow2 -o OPTS img SIZE`.
fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let t = TestImage::build(dir, name, "qcow2").opts(opts).size(size);
    t.qemu().path
}

/// Fill an image with random data, zeros, discards and (separately) compressed clusters.
fn populate(dir: &Path, img: &Path, cs: u64, seed: u64) {
    let data = write_file(
        dir,
        &format!("rand{seed}"),
        &random_bytes(seed, 3 * cs as usize + 777),
    );
    let d = data.to_str().unwrap();
    let cmds = [
        format!("write -s {d} 0 {}", 3 * cs + 777),
        format!("write -s {d} {} {}", 7 * cs + 100, cs + 5),
        format!("write -z {} {}", cs, cs),
        format!("discard {} {}", 2 * cs, cs),
        format!("write -s {d} {} {}", 20 * cs - 3, 2 * cs),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", img, &cmds);
    // Compressed writes in their own process, into unallocated clusters only.
    let zc = [
        format!("write -c -s {d} {} {}", 12 * cs, cs),
        format!("write -c -s {d} {} {}", 13 * cs, cs),
        format!("write -c -s {d} {} {}", 16 * cs, cs),
    ];
    let zc: Vec<&str> = zc.iter().map(String::as_str).collect();
    qemu_io("qcow2", img, &zc);
    assert_check_clean("qcow2", img);
}

fn assert_reads_like_qemu(img: &Path) -> Vec<u8> {
    let want = qemu_raw(img);
    let i = open(img, true);
    assert_eq!(i.size(), want.len() as u64);
    assert_same(&engine_read_all(&i), &want, &img.display().to_string());
    want
}

/// Writes covering the interesting cases for an image populated by `populate`.
fn scribble(img: &Image, want: &mut [u8], cs: u64, seed: u64) {
    let size = want.len() as u64;
    let spots = [
        (5, 10),               // inside the first data cluster
        (cs - 7, 20),          // spanning two allocated clusters
        (cs + 3, 100),         // into a zero cluster
        (2 * cs + cs / 2, cs), // discarded -> next
        (12 * cs + 9, 33),     // compressed
        (13 * cs - 1, cs + 2), // data | compressed | next
        (17 * cs - 5, 2 * cs), // compressed | unallocated | unallocated: one run
        (30 * cs + 1, 3 * cs), // unallocated, several clusters
        (size - 9, 9),         // the end of the disk
        (40 * cs, 2 * cs),     // aligned, unallocated
    ];
    for (k, (off, len)) in spots.into_iter().enumerate() {
        if off + len > size {
            continue;
        }
        let buf = random_bytes(seed * 100 + k as u64, len as usize);
        img.write_at(&buf, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
}

fn finish(img: Image, path: &Path, want: &[u8]) {
    img.close().unwrap();
    drop(img);
    assert_check_clean("qcow2", path);
    assert_compare_bytes("qcow2", path, want);
    let again = open(path, true);
    assert_same(&engine_read_all(&again), want, "reopen");
}

#[test]
fn read_and_write_across_options() {
    let d = tmpdir();
    let cases = [
        ("compat=1.1,cluster_size=65536", 65536u64),
        ("compat=0.10,cluster_size=65536", 65536),
        ("compat=1.1,cluster_size=512,refcount_bits=1", 512),
        ("compat=1.1,cluster_size=4096,refcount_bits=64", 4096),
        (
            "compat=1.1,cluster_size=4096,refcount_bits=2,lazy_refcounts=on",
            4096,
        ),
        ("compat=1.1,cluster_size=65536,extended_l2=on", 65536),
        (
            "compat=1.1,cluster_size=16384,extended_l2=on,compression_type=zstd",
            16384,
        ),
        ("compat=1.1,cluster_size=2M,refcount_bits=32", 2 << 20),
        ("compat=1.1,cluster_size=8192,refcount_bits=4", 8192),
        (
            "compat=1.1,cluster_size=32768,refcount_bits=8,extended_l2=on",
            32768,
        ),
        ("compat=0.10,cluster_size=1024", 1024),
    ];
    for (i, (opts, cs)) in cases.into_iter().enumerate() {
        // Virtual size not a multiple of the cluster size.
        let size = 48 * cs + 1536;
        let p = create(d.path(), &format!("img{i}.qcow2"), opts, &size.to_string());
        populate(d.path(), &p, cs, i as u64);
        let mut want = assert_reads_like_qemu(&p);
        let img = open(&p, false);
        scribble(&img, &mut want, cs, i as u64);
        // Zero and discard whole clusters through the engine.
        img.write_zeroes(0, 2 * cs, true).unwrap();
        img.write_zeroes(7 * cs, cs, false).unwrap();
        want[..2 * cs as usize].fill(0);
        want[7 * cs as usize..8 * cs as usize].fill(0);
        assert_same(&engine_read_all(&img), &want, opts);
        finish(img, &p, &want);
        assert_eq!(
            imgfs::formats::qcow2::Qcow2
                .check(
                    imgfs::host::HostFile::open(&p, false).unwrap(),
                    Repair::None
                )
                .unwrap()
                .exit_code(),
            0,
            "{opts}"
        );
    }
}

#[test]
fn backing_chains() {
    let d = tmpdir();
    let base = d.path().join("base.raw");
    std::fs::write(&base, random_bytes(1, 3 << 20)).unwrap();
    let mid = TestImage::build(d.path(), "mid.qcow2", "qcow2")
        .opt("cluster_size", 4096)
        .backing("base.raw", Some("raw"))
        .qemu()
        .path;
    populate(d.path(), &mid, 4096, 7);
    let top = TestImage::build(d.path(), "top.qcow2", "qcow2")
        .opt("cluster_size", 65536)
        .backing("mid.qcow2", Some("qcow2"))
        .size("4M")
        .qemu();
    top.io(&[
        "write -P 0x5a 70000 5000",
        "write -z 131072 65536",
        "discard 262144 65536",
    ]);
    let top = top.path;
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let mut want = assert_reads_like_qemu(&top);
    let img = open(&top, false);
    assert_eq!(img.info().backing.unwrap().format.as_deref(), Some("qcow2"));
    scribble(&img, &mut want, 65536, 3);
    // Partial writes into clusters that show the backing file: filled from below.
    for (off, len) in [(1000u64, 10u64), (65536 * 5 + 4095, 3), (3 << 20, 70000)] {
        let buf = random_bytes(off, len as usize);
        img.write_at(&buf, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    img.write_zeroes(65536 * 8, 65536 * 2, true).unwrap();
    want[65536 * 8..65536 * 10].fill(0);
    finish(img, &top, &want);
    assert_eq!(std::fs::read(&base).unwrap(), base_before, "base changed");
    assert_eq!(std::fs::read(&mid).unwrap(), mid_before, "mid changed");
}

#[test]
fn v2_over_backing_writes_zero_bytes() {
    let d = tmpdir();
    let base = d.path().join("b.raw");
    std::fs::write(&base, random_bytes(9, 1 << 20)).unwrap();
    let p = TestImage::build(d.path(), "v2.qcow2", "qcow2")
        .opts("compat=0.10,cluster_size=4096")
        .backing("b.raw", Some("raw"))
        .qemu()
        .path;
    let mut want = qemu_raw(&p);
    let img = open(&p, false);
    img.write_zeroes(8192, 8192, true).unwrap();
    want[8192..16384].fill(0);
    finish(img, &p, &want);
}

#[test]
fn internal_snapshots_views_and_cow() {
    let d = tmpdir();
    for opts in [
        "cluster_size=4096",
        "cluster_size=65536,extended_l2=on",
        "compat=0.10,cluster_size=4096",
    ] {
        let p = create(d.path(), "snap.qcow2", opts, "2M");
        let cs = if opts.contains("65536") { 65536 } else { 4096 };
        populate(d.path(), &p, cs, 11);
        qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
        qemu_io(
            "qcow2",
            &p,
            &["write -P 0x11 0 5000", "write -P 0x22 100000 3"],
        );
        qemu_img(&["snapshot", "-c", "two", p.to_str().unwrap()]);
        let snap_raw = |name: &str| {
            let out = d.path().join(format!("{name}.raw"));
            qemu_img(&[
                "convert",
                "-l",
                &format!("snapshot.name={name}"),
                "-O",
                "raw",
                p.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            std::fs::read(&out).unwrap()
        };
        let one = snap_raw("one");
        let two = snap_raw("two");
        let mut want = qemu_raw(&p);
        let img = open(&p, false);
        let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["one", "two"]);
        // Writes into clusters shared with both snapshots (refcount 3), and zeroing them.
        scribble(&img, &mut want, cs, 5);
        img.write_zeroes(3 * cs, cs, false).unwrap();
        want[3 * cs as usize..4 * cs as usize].fill(0);
        img.flush().unwrap();
        for (name, data) in [("one", &one), ("two", &two)] {
            let v = img.open_snapshot(name).unwrap();
            assert_same(&engine_read_all(&v), data, name);
        }
        let by_id = img.open_snapshot("1").unwrap();
        assert_same(&engine_read_all(&by_id), &one, "id 1");
        drop(by_id);
        finish(img, &p, &want);
        let hf = imgfs::host::HostFile::open(&p, false).unwrap();
        let r = imgfs::formats::qcow2::Qcow2
            .check(hf, Repair::None)
            .unwrap();
        assert_eq!(r.exit_code(), 0, "{opts}: {:?}", r.messages);
        assert_same(&snap_raw("one"), &one, "snapshot one after writes");
        assert_same(&snap_raw("two"), &two, "snapshot two after writes");
        std::fs::remove_file(&p).unwrap();
    }
}

#[test]
fn dirty_lazy_refcounts_image_is_rebuilt() {
    let d = tmpdir();
    let p = create(
        d.path(),
        "lazy.qcow2",
        "lazy_refcounts=on,cluster_size=4096",
        "4M",
    );
    // qemu-io aborts without closing: dirty bit set, refcounts not written.
    TestImage::at(&p, "qcow2")
        .io_then_abort(&["write -P 0x33 0 200000", "write -P 0x44 1000000 8192"]);
    let (code, out) = qemu_check("qcow2", &p);
    assert_ne!(code, 0, "image should need repair: {out}");
    let ro = open(&p, true);
    assert_eq!(ro.info().details["dirty"], true);
    let want = engine_read_all(&ro);
    drop(ro);
    let mut want2 = want.clone();
    {
        let img = open(&p, false);
        assert_eq!(img.info().details["dirty"], false);
        img.write_at(&[7u8; 3000], 2_000_000).unwrap();
        want2[2_000_000..2_003_000].fill(7);
        finish(img, &p, &want2);
    }
    assert_eq!(want[0], 0x33);
    assert_eq!(want[1_000_000], 0x44);
}

#[test]
fn check_reports_and_repairs_leaks() {
    let d = tmpdir();
    let p = create(
        d.path(),
        "leak.qcow2",
        "lazy_refcounts=on,cluster_size=4096",
        "4M",
    );
    TestImage::at(&p, "qcow2").io_then_abort(&["write -P 0x33 0 20000"]);
    let hf = imgfs::host::HostFile::open(&p, false).unwrap();
    let r = imgfs::formats::qcow2::Qcow2
        .check(hf, Repair::None)
        .unwrap();
    assert_ne!(r.exit_code(), 0, "{:?}", r.messages);
    let hf = imgfs::host::HostFile::open(&p, true).unwrap();
    let r = imgfs::formats::qcow2::Qcow2.check(hf, Repair::All).unwrap();
    assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    assert_check_clean("qcow2", &p);
}

#[test]
fn create_makes_images_qemu_accepts() {
    let d = tmpdir();
    TestImage::build(d.path(), "base.qcow2", "qcow2")
        .size("3M")
        .qemu();
    let cases: &[&[(&str, &str)]] = &[
        &[],
        &[("compat", "0.10"), ("cluster_size", "512")],
        &[
            ("cluster_size", "4096"),
            ("refcount_bits", "1"),
            ("lazy_refcounts", "on"),
        ],
        &[
            ("cluster_size", "65536"),
            ("extended_l2", "on"),
            ("refcount_bits", "64"),
        ],
        &[("cluster_size", "2M"), ("preallocation", "metadata")],
        &[
            ("cluster_size", "65536"),
            ("preallocation", "metadata"),
            ("extended_l2", "on"),
        ],
        &[
            ("cluster_size", "4096"),
            ("preallocation", "metadata"),
            ("extended_l2", "off"),
        ],
    ];
    for (i, opts) in cases.iter().enumerate() {
        for with_backing in [false, true] {
            let name = format!("new{i}{with_backing}.qcow2");
            let mut spec = TestImage::build(d.path(), &name, "qcow2").size(5 << 20);
            for (k, v) in opts.iter() {
                spec = spec.opt(k, v);
            }
            if with_backing {
                spec = spec.backing("base.qcow2", Some("qcow2"));
            }
            let p = spec.imgfs().path;
            assert_check_clean("qcow2", &p);
            let info = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(v["virtual-size"], 5 << 20);
            let cs = opts
                .iter()
                .find(|(k, _)| *k == "cluster_size")
                .map_or("65536", |(_, v)| v);
            let cs = if cs == "2M" {
                2 << 20
            } else {
                cs.parse::<u64>().unwrap()
            };
            assert_eq!(v["cluster-size"], cs, "{info}");
            if with_backing {
                assert_eq!(v["backing-filename"], "base.qcow2");
            }
            // And we can write it.
            let mut want = qemu_raw(&p);
            let img = open(&p, false);
            let buf = random_bytes(i as u64, 100_000);
            img.write_at(&buf, 12345).unwrap();
            want[12345..112345].copy_from_slice(&buf);
            finish(img, &p, &want);
        }
    }
}

#[test]
fn external_data_file() {
    let d = tmpdir();
    for raw in ["off", "on"] {
        let p = d.path().join(format!("ext{raw}.qcow2"));
        // QEMU resolves a relative data_file name against its working directory.
        let data = d.path().join(format!("ext{raw}.data"));
        let data = data.to_str().unwrap();
        TestImage::build(d.path(), &format!("ext{raw}.qcow2"), "qcow2")
            .opts(&format!(
                "data_file={data},data_file_raw={raw},cluster_size=4096"
            ))
            .size("1M")
            .qemu()
            .io(&["write -P 0x61 5000 10000", "write -z 40960 8192"]);
        let mut want = assert_reads_like_qemu(&p);
        let img = open(&p, false);
        scribble(&img, &mut want, 4096, 1);
        img.write_zeroes(4096, 8192, true).unwrap();
        want[4096..12288].fill(0);
        finish(img, &p, &want);
    }
}

#[test]
fn refuses_what_it_cannot_handle() {
    let d = tmpdir();
    let p = create(d.path(), "bits.qcow2", "", "1M");
    // Unknown incompatible bit 20.
    let mut b = std::fs::read(&p).unwrap();
    b[72..80].copy_from_slice(&(1u64 << 20).to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = Image::open(&p, &OpenOpts::default()).unwrap_err();
    assert!(e.to_string().contains("bit 20"), "{e}");
    // Corrupt bit: read-only only.
    b[72..80].copy_from_slice(&2u64.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = Image::open(&p, &OpenOpts::default()).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    open(&p, true);
    // Encryption.
    let p = d.path().join("enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        p.to_str().unwrap(),
        "1M",
    ]);
    let e = Image::open(&p, &OpenOpts::default()).unwrap_err();
    assert!(e.to_string().contains("encrypt"), "{e}");
}

#[test]
fn bitmaps_autoclear_is_cleared_on_write() {
    let d = tmpdir();
    let p = create(d.path(), "bm.qcow2", "cluster_size=65536", "4M");
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b1"]);
    qemu_io("qcow2", &p, &["write -P 1 0 70000", "write -P 2 3M 70000"]);
    assert_check_clean("qcow2", &p);
    assert!(qemu_img(&["info", p.to_str().unwrap()]).contains("b1"));
    let mut want = assert_reads_like_qemu(&p);
    let img = open(&p, false);
    img.write_at(&[9; 10], 100).unwrap();
    want[100..110].fill(9);
    // The bitmaps are stale once the autoclear bit is cleared: imgfs drops the extension and
    // frees their clusters, so QEMU finds neither leaks nor bitmaps.
    finish(img, &p, &want);
    let info = qemu_img(&["info", p.to_str().unwrap()]);
    assert!(!info.contains("b0"), "{info}");
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[88..96], &[0u8; 8], "autoclear bits must be cleared");
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and the
    // initial one-cluster table 2 MiB, so writing 6 MiB must add blocks and move the table.
    let d = tmpdir();
    let p = create(
        d.path(),
        "grow.qcow2",
        "cluster_size=512,refcount_bits=64",
        "8M",
    );
    let mut want = vec![0u8; 8 << 20];
    let img = open(&p, false);
    for k in 0..12u64 {
        let off = k * 500_000 + 77;
        let buf = random_bytes(k, 400_000);
        img.write_at(&buf, off).unwrap();
        want[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        if k % 4 == 3 {
            img.flush().unwrap();
        }
    }
    img.write_zeroes(1 << 20, 1 << 20, true).unwrap();
    want[1 << 20..2 << 20].fill(0);
    finish(img, &p, &want);
    let b = std::fs::read(&p).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
    let rt_clusters = u32::from_be_bytes(b[56..60].try_into().unwrap());
    assert!(
        rt != 512 && rt_clusters > 1,
        "table did not move: {rt:#x} {rt_clusters}"
    );
}

#[test]
fn mutated_images_never_panic() {
    // Random corruption of the metadata of a real image (header, refcount structures, L1, L2
    // tables): opening, reading, writing and checking may fail, but never panic or hang.
    let d = tmpdir();
    let p = create(
        d.path(),
        "fuzz.qcow2",
        "cluster_size=4096,refcount_bits=4",
        "1M",
    );
    populate(d.path(), &p, 4096, 3);
    qemu_img(&["snapshot", "-c", "s", p.to_str().unwrap()]);
    let orig = std::fs::read(&p).unwrap();
    // Metadata lives in the first clusters and wherever qemu put L2 tables; mutate everywhere
    // in the first 64 KiB and at random places elsewhere.
    let mut rng = imgfs::host::SplitMix64::new(
        std::env::var("QCOW2_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(42),
    );
    let rounds = std::env::var("QCOW2_FUZZ_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400u64);
    for round in 0..rounds {
        let mut b = orig.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(4) == 0 {
                rng.below(b.len() as u64)
            } else {
                rng.below(65536.min(b.len() as u64))
            } as usize;
            b[at] = match rng.below(3) {
                0 => b[at] ^ (1 << rng.below(8)),
                1 => 0xff,
                _ => rng.next_u64() as u8,
            };
        }
        let f = imgfs::host::FaultFile::new(b);
        let opts = OpenOpts {
            format: Some("qcow2".into()),
            lock: false,
            ..OpenOpts::default()
        };
        if let Ok(img) = Image::open_host(f.host_file(&p, true), &opts) {
            let mut buf = vec![0u8; img.size().min(1 << 20) as usize];
            let _ = img.read_at(&mut buf, 0);
            for s in img.snapshots() {
                if let Ok(v) = img.open_snapshot(&s.id) {
                    let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
                    let _ = v.read_at(&mut buf, 0);
                }
            }
            let len = 70_000.min(img.size());
            let _ = img.write_at(&vec![round as u8; len as usize], img.size() - len);
            let _ = img.write_zeroes(0, 8192.min(img.size() / 4096 * 4096), true);
            let _ = img.close();
        }
        let _ = imgfs::formats::qcow2::Qcow2.check(f.host_file(&p, true), Repair::All);
    }
}

#[test]
fn compressed_images_from_convert() {
    // qemu-img convert -c packs compressed clusters back to back, sharing host clusters.
    let d = tmpdir();
    let src = d.path().join("src.raw");
    let mut content = random_bytes(4, 1 << 20);
    for (i, chunk) in content.chunks_mut(8192).enumerate() {
        if i % 3 == 0 {
            chunk.fill(i as u8); // compressible
        } else if i % 3 == 1 {
            chunk[..4096].fill(0);
        }
    }
    std::fs::write(&src, &content).unwrap();
    for ty in ["zlib", "zstd"] {
        let p = d.path().join(format!("c-{ty}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size=4096,compression_type={ty}"),
            src.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        assert_check_clean("qcow2", &p);
        let mut want = assert_reads_like_qemu(&p);
        let img = open(&p, false);
        scribble(&img, &mut want, 4096, 8);
        img.write_zeroes(4096 * 50, 4096 * 10, true).unwrap();
        want[4096 * 50..4096 * 60].fill(0);
        finish(img, &p, &want);
    }
}

#[test]
fn parallel_readers_and_writers() {
    let d = tmpdir();
    let p = create(d.path(), "par.qcow2", "cluster_size=4096", "8M");
    populate(d.path(), &p, 4096, 9);
    let want = qemu_raw(&p);
    let img = std::sync::Arc::new(open(&p, false));
    let mut handles = Vec::new();
    // Readers over the populated first half, writers each in their own region of the second.
    for t in 0..4u64 {
        let img = img.clone();
        let want = want.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = imgfs::host::SplitMix64::new(t);
            for _ in 0..200 {
                let off = rng.below(4 << 20);
                let len = 1 + rng.below(50_000).min((4 << 20) - off - 1);
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off).unwrap();
                assert!(
                    buf == want[off as usize..(off + len) as usize],
                    "read at {off:#x}"
                );
            }
        }));
    }
    for t in 0..3u64 {
        let img = img.clone();
        handles.push(std::thread::spawn(move || {
            let base = (4 << 20) + t * (1 << 20);
            for k in 0..50u64 {
                let buf = random_bytes(t * 1000 + k, 20_000);
                img.write_at(&buf, base + k * 20_000).unwrap();
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut expect = want.clone();
    for t in 0..3u64 {
        let base = (4 << 20) + t * (1 << 20);
        for k in 0..50u64 {
            let at = (base + k * 20_000) as usize;
            expect[at..at + 20_000].copy_from_slice(&random_bytes(t * 1000 + k, 20_000));
        }
    }
    let img = std::sync::Arc::try_unwrap(img).unwrap();
    finish(img, &p, &expect);
}

#[test]
fn huge_sparse_image() {
    // A 4 TiB image: L1 of 65536 entries; touch a few far-apart places only.
    let d = tmpdir();
    let p = create(d.path(), "huge.qcow2", "cluster_size=65536", "4T");
    qemu_io("qcow2", &p, &["write -P 0x77 3T 70000"]);
    {
        let img = open(&p, false);
        let mut buf = vec![0u8; 70000];
        img.read_at(&mut buf, 3 << 40).unwrap();
        assert!(buf.iter().all(|&b| b == 0x77));
        img.write_at(&[0x99; 5000], (2 << 40) + 12345).unwrap();
        img.write_at(&[0x98; 100], (4 << 40) - 100).unwrap();
        img.close().unwrap();
    }
    assert_check_clean("qcow2", &p);
    qemu_io(
        "qcow2",
        &p,
        &[
            "read -P 0x99 2199023267897 5000",
            "read -P 0x98 4398046511004 100",
            "read -P 0 0 65536",
        ],
    );
    assert!(std::fs::metadata(&p).unwrap().len() < 4 << 20);
}

#[test]
fn check_finds_and_repairs_refcount_corruption() {
    let d = tmpdir();
    let p = create(d.path(), "bad.qcow2", "cluster_size=4096", "1M");
    qemu_io("qcow2", &p, &["write -P 0x42 0 8192"]);
    let want = qemu_raw(&p);
    let mut b = std::fs::read(&p).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = be64(&b, 48) as usize;
    let block = be64(&b, rt) as usize;
    // Refcount of the first data cluster -> 0 (a corruption), and a leaked cluster.
    let e = block + 2 * (data / 4096);
    b[e..e + 2].copy_from_slice(&[0, 0]);
    let leak = block + 2 * 200;
    b[leak..leak + 2].copy_from_slice(&[0, 1]);
    std::fs::write(&p, &b).unwrap();
    let (code, _) = qemu_check("qcow2", &p);
    assert_eq!(code, 2);
    let q = imgfs::formats::qcow2::Qcow2;
    let r = q
        .check(
            imgfs::host::HostFile::open(&p, false).unwrap(),
            Repair::None,
        )
        .unwrap();
    assert_eq!(
        (r.exit_code(), r.corruptions, r.leaks),
        (2, 1, 1),
        "{:?}",
        r.messages
    );
    let r = q
        .check(
            imgfs::host::HostFile::open(&p, true).unwrap(),
            Repair::Leaks,
        )
        .unwrap();
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    let r = q
        .check(imgfs::host::HostFile::open(&p, true).unwrap(), Repair::All)
        .unwrap();
    assert_eq!(r.exit_code(), 0, "{:?}", r.messages);
    assert_check_clean("qcow2", &p);
    assert_same(&qemu_raw(&p), &want, "after repair");
}

/// Rough throughput numbers (run with `cargo test --release --test qcow2 -- --ignored bench`).
#[test]
#[ignore]
fn bench_sequential_and_random() {
    let d = tmpdir();
    for cs in ["65536", "4096"] {
        let p = create(
            d.path(),
            &format!("bench{cs}.qcow2"),
            &format!("cluster_size={cs}"),
            "1G",
        );
        let img = open(&p, false);
        let buf = random_bytes(1, 1 << 20);
        let t = std::time::Instant::now();
        for i in 0..256u64 {
            img.write_at(&buf, i << 20).unwrap();
        }
        img.flush().unwrap();
        let w = t.elapsed();
        let mut rbuf = vec![0u8; 1 << 20];
        let t = std::time::Instant::now();
        for i in 0..256u64 {
            img.read_at(&mut rbuf, i << 20).unwrap();
        }
        let r = t.elapsed();
        let mut rng = imgfs::host::SplitMix64::new(3);
        let mut small = vec![0u8; 4096];
        let t = std::time::Instant::now();
        for _ in 0..20000 {
            let off = rng.below(256 << 8) << 12;
            img.read_at(&mut small, off).unwrap();
        }
        let rr = t.elapsed();
        let t = std::time::Instant::now();
        for k in 0..5000u64 {
            let off = (256 << 20) + rng.below(512 << 8) * 4096;
            img.write_at(&small, off).unwrap();
            if k % 1000 == 999 {
                img.flush().unwrap();
            }
        }
        img.flush().unwrap();
        let rw = t.elapsed();
        eprintln!(
            "cluster {cs}: seq write 256 MiB {:.0} MiB/s, seq read {:.0} MiB/s, \
             4K random read {:.0} IOPS, 4K random allocating write {:.0} IOPS",
            256.0 / w.as_secs_f64(),
            256.0 / r.as_secs_f64(),
            20000.0 / rr.as_secs_f64(),
            5000.0 / rw.as_secs_f64()
        );
        img.close().unwrap();
        drop(img);
        assert_check_clean("qcow2", &p);
    }
}

#[test]
fn extended_l2_subclusters_over_backing() {
    // 32 KiB clusters = 32 subclusters of 1 KiB: QEMU allocates and zeroes per subcluster, and
    // unallocated subclusters show the backing file.
    let d = tmpdir();
    std::fs::write(d.path().join("base.raw"), random_bytes(21, 2 << 20)).unwrap();
    let p = TestImage::build(d.path(), "sub.qcow2", "qcow2")
        .opts("cluster_size=32768,extended_l2=on")
        .backing("base.raw", Some("raw"))
        .size("2M")
        .qemu()
        .path;
    let data = write_file(d.path(), "r", &random_bytes(22, 10000));
    let dd = data.to_str().unwrap();
    qemu_io(
        "qcow2",
        &p,
        &[
            &format!("write -s {dd} 1024 3000"),
            &format!("write -s {dd} 40960 1024"),
            "write -z 45056 2048",
            "write -z 65536 1024",
            &format!("write -s {dd} 100000 10000"),
            "discard 131072 32768",
        ],
    );
    assert_check_clean("qcow2", &p);
    let mut want = assert_reads_like_qemu(&p);
    let img = open(&p, false);
    for (k, (off, len)) in [
        (500u64, 100u64),
        (4000, 200),
        (45000, 3000),
        (65536 + 512, 100),
        (131072 + 5, 10),
        (200_000, 40_000),
    ]
    .into_iter()
    .enumerate()
    {
        let buf = random_bytes(300 + k as u64, len as usize);
        img.write_at(&buf, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    img.write_zeroes(32768 * 10, 32768, false).unwrap();
    want[32768 * 10..32768 * 11].fill(0);
    finish(img, &p, &want);
}
