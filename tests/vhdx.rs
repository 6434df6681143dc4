//! VHDX end to end: images from qemu-img/qemu-io read equal to `qemu-img convert`, writes
//! through the engine pass `qemu-img check` and `compare`, differencing and 4 KiB-sector images
//! made by imgfs read back (and by libvhdi), hostile metadata gives errors.

mod common;

use common::*;
use imgfs::{Image, OpenOpts};
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn open(p: &Path, read_only: bool) -> Image {
    Image::open(
        p,
        &OpenOpts {
            read_only,
            ..OpenOpts::default()
        },
    )
    .unwrap()
}

/// `qemu-img create -f vhdx -o OPTS DIR/NAME SIZE`.
fn qemu_create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let t = TestImage::build(dir, name, "vhdx").opts(opts).size(size);
    t.qemu().path
}

/// Random data at unaligned offsets, spanning blocks, plus zeroed and patterned ranges.
fn fill_with_qemu(dir: &Path, img: &Path, size: u64, seed: u64) {
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let mut cmds = vec![];
    for i in 0..8 {
        let len = 512 * (1 + rng.below(3000));
        let off = rng.below(size - len) / 512 * 512;
        let f = write_file(
            dir,
            &format!("rand{seed}-{i}"),
            &random_bytes(seed * 100 + i, len as usize),
        );
        cmds.push(format!("write -s {} {off} {len}", f.display()));
    }
    cmds.push(format!("write -z {} {}", size / 2, MIB / 2));
    cmds.push(format!("write -P 0x5a {} 4096", size - 4096));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("vhdx", img, &refs);
}

#[test]
fn reads_equal_qemu_across_options() {
    let d = tmpdir();
    let cases = [
        ("block_size=1M,log_size=1M", 24 * MIB),
        ("block_size=8M,log_size=2M", 40 * MIB),
        ("block_size=32M", 72 * MIB),
        ("block_size=1M,subformat=fixed", 12 * MIB),
        ("block_size=1M,block_state_zero=off", 20 * MIB),
        (
            "block_size=8M,subformat=fixed,block_state_zero=off",
            24 * MIB + 512,
        ),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let img = qemu_create(d.path(), &format!("r{i}.vhdx"), opts, *size);
        fill_with_qemu(d.path(), &img, *size, i as u64 + 1);
        assert_check_clean("vhdx", &img);
        let want = qemu_raw(&img);
        let im = open(&img, true);
        assert_eq!(im.size(), *size, "{opts}");
        assert_same(&engine_read_all(&im), &want, opts);
    }
}

/// Apply writes through the engine and to the expected buffer.
fn engine_writes(im: &Image, want: &mut [u8], seed: u64, bs: u64) {
    let size = want.len() as u64;
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let spots = [
        (0, 100),
        (bs - 300, 1000),         // spans a block boundary
        (3 * bs + 7, 2 * bs + 5), // spans several blocks, unaligned
        (size - 777, 777),        // last bytes
    ];
    for (off, len) in spots {
        if off + len > size {
            continue;
        }
        let buf = random_bytes(rng.next_u64(), len as usize);
        im.write_at(&buf, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    for _ in 0..20 {
        let len = 1 + rng.below(200_000);
        let off = rng.below(size - len);
        let buf = random_bytes(rng.next_u64(), len as usize);
        im.write_at(&buf, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&buf);
        if rng.below(4) == 0 {
            im.flush().unwrap();
        }
    }
    // Zero a whole block (and unmap another), then write into part of the first again.
    im.write_zeroes(bs, bs, false).unwrap();
    want[bs as usize..2 * bs as usize].fill(0);
    im.write_zeroes(3 * bs, bs, true).unwrap();
    want[3 * bs as usize..4 * bs as usize].fill(0);
    let buf = random_bytes(rng.next_u64(), 5000);
    im.write_at(&buf, bs + 1234).unwrap();
    want[(bs + 1234) as usize..(bs + 1234 + 5000) as usize].copy_from_slice(&buf);
}

#[test]
fn engine_writes_pass_qemu_check_and_compare() {
    let d = tmpdir();
    let cases = [
        ("block_size=1M", 16 * MIB, MIB),
        ("block_size=8M,log_size=2M", 48 * MIB, 8 * MIB),
        ("block_size=1M,subformat=fixed", 10 * MIB, MIB),
        ("block_size=1M,block_state_zero=off", 12 * MIB, MIB),
    ];
    for (i, (opts, size, bs)) in cases.iter().enumerate() {
        let img = qemu_create(d.path(), &format!("w{i}.vhdx"), opts, *size);
        fill_with_qemu(d.path(), &img, *size, 40 + i as u64);
        let mut want = qemu_raw(&img);
        {
            let im = open(&img, false);
            engine_writes(&im, &mut want, i as u64, *bs);
            assert_same(&engine_read_all(&im), &want, "before close");
            im.close().unwrap();
        }
        assert_check_clean("vhdx", &img);
        let expect = write_file(d.path(), &format!("w{i}.raw"), &want);
        assert_compare("vhdx", &img, &expect);
        let im = open(&img, true);
        assert_same(&engine_read_all(&im), &want, "reopen");
    }
}

/// imgfs's create of `path` (size 0 with a backing file: the parent's size).
fn create(path: &Path, size: u64, opts: &[(&str, &str)], backing: Option<&Path>) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let mut t = TestImage::build(path.parent().unwrap(), name, "vhdx");
    for (k, v) in opts {
        t = t.opt(k, v);
    }
    if size != 0 {
        t = t.size(size);
    }
    if let Some(b) = backing {
        t = t.backing(b.file_name().unwrap().to_str().unwrap(), Some("vhdx"));
    }
    t.imgfs();
}

/// imgfs's create of a 4 KiB-sector image with 1 MiB blocks.
fn create_4k(path: &Path, size: u64) {
    create(
        path,
        size,
        &[("block_size", "1M"), ("logical_sector_size", "4096")],
        None,
    );
}

#[test]
fn created_images_open_in_qemu_and_take_writes() {
    let d = tmpdir();
    for (i, opts) in [
        vec![("block_size", "1M")],
        vec![("block_size", "2M"), ("subformat", "fixed")],
        vec![
            ("block_size", "1M"),
            ("log_size", "2M"),
            ("block_state_zero", "on"),
        ],
    ]
    .iter()
    .enumerate()
    {
        let img = d.path().join(format!("c{i}.vhdx"));
        let size = 9 * MIB + 512 * 3;
        create(&img, size, opts, None);
        assert_check_clean("vhdx", &img);
        let info = qemu_img(&["info", img.to_str().unwrap()]);
        assert!(info.contains("vhdx"), "{info}");
        let mut want = vec![0u8; size as usize];
        {
            let im = open(&img, false);
            engine_writes(&im, &mut want, 77 + i as u64, 1 << 20);
            im.close().unwrap();
        }
        assert_check_clean("vhdx", &img);
        assert_same(&qemu_raw(&img), &want, "qemu reads imgfs writes");
    }
}

fn vhdiinfo(p: &Path) -> String {
    let out = run("vhdiinfo", &[p.to_str().unwrap()]);
    let s = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "vhdiinfo {}: {s}", p.display());
    s
}

#[test]
fn sector_4096_image_round_trip_and_vhdiinfo() {
    let d = tmpdir();
    let img = d.path().join("s4k.vhdx");
    let size = 12 * MIB;
    create_4k(&img, size);
    let mut want = vec![0u8; size as usize];
    {
        let im = open(&img, false);
        assert_eq!(im.info().details["logical_sector_size"], 4096);
        engine_writes(&im, &mut want, 5, MIB);
        im.close().unwrap();
    }
    let im = open(&img, true);
    assert_same(&engine_read_all(&im), &want, "4k reopen");
    let info = vhdiinfo(&img);
    assert!(info.contains("4096"), "{info}");
}

#[test]
fn differencing_child_reads_parent_and_takes_writes() {
    let d = tmpdir();
    let size = 20 * MIB;
    let parent = qemu_create(d.path(), "base.vhdx", "block_size=1M", size);
    fill_with_qemu(d.path(), &parent, size, 9);
    let base = qemu_raw(&parent);
    let child = d.path().join("child.vhdx");
    create(&child, 0, &[("block_size", "1M")], Some(&parent));
    let im = open(&child, false);
    assert_eq!(im.info().backing.unwrap().name, "base.vhdx");
    assert_same(&engine_read_all(&im), &base, "fresh child shows the parent");
    let mut want = base.clone();
    engine_writes(&im, &mut want, 11, MIB);
    // Small unaligned writes inside partially present blocks.
    for (off, len) in [
        (5 * MIB + 100, 10),
        (5 * MIB + 700, 3000),
        (7 * MIB + 511, 2),
    ] {
        let buf = random_bytes(off, len);
        im.write_at(&buf, off).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&buf);
    }
    assert_same(&engine_read_all(&im), &want, "child after writes");
    im.close().unwrap();
    drop(im);
    let im = open(&child, true);
    assert_same(&engine_read_all(&im), &want, "child reopen");
    assert_same(&qemu_raw(&parent), &base, "parent unchanged");
    let info = vhdiinfo(&child);
    assert!(
        info.to_lowercase().contains("differential") || info.contains("Parent"),
        "{info}"
    );
}

/// Hostile bytes at `at` in a copy of `src`: open must fail with an error, not panic.
fn hostile(
    src: &[u8],
    dir: &Path,
    name: &str,
    at: usize,
    bytes: &[u8],
    fix_crc: Option<(usize, usize)>,
) -> imgfs::Result<Image> {
    let mut b = src.to_vec();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    if let Some((start, len)) = fix_crc {
        b[start + 4..start + 8].fill(0);
        let c = crc32c::crc32c(&b[start..start + len]);
        b[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
    }
    let p = write_file(dir, name, &b);
    Image::open(&p, &open_opts(true))
}

#[test]
fn hostile_images_give_errors() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "h.vhdx", "block_size=1M", 8 * MIB);
    qemu_io("vhdx", &img, &["write -P 1 0 3M"]);
    let src = std::fs::read(&img).unwrap();
    let h1 = 64 << 10;
    let h2 = 128 << 10;
    let rt = 192 << 10;
    // Both headers broken.
    let mut b = src.clone();
    b[h1 + 8] ^= 1;
    b[h2 + 8] ^= 1;
    let p = write_file(d.path(), "bad-headers.vhdx", &b);
    assert!(Image::open(&p, &open_opts(true),).is_err());
    // Log offset into the header section (CRC fixed up on both headers).
    for h in [h1, h2] {
        let e = hostile(
            &src,
            d.path(),
            "log.vhdx",
            h + 72,
            &4096u64.to_le_bytes(),
            Some((h, 4096)),
        );
        let _ = e.map(|_| ()); // one header may still be good
    }
    // Region table: BAT offset into the header, and past EOF (both copies).
    let mut b = src.clone();
    for r in [rt, 256 << 10] {
        b[r + 16 + 16..r + 16 + 24].copy_from_slice(&(!0xfffffu64).to_le_bytes());
        b[r + 4..r + 8].fill(0);
        let c = crc32c::crc32c(&b[r..r + (64 << 10)]);
        b[r + 4..r + 8].copy_from_slice(&c.to_le_bytes());
    }
    let p = write_file(d.path(), "bat-eof.vhdx", &b);
    assert!(Image::open(&p, &open_opts(true),).is_err());
    // A BAT entry pointing into the header section or the metadata: reads fail cleanly.
    let bat = u64::from_le_bytes(src[rt + 32..rt + 40].try_into().unwrap()) as usize;
    for target in [0u64, bat as u64] {
        let e = (target & !0xfffff) | 6;
        let im = hostile(
            &src,
            d.path(),
            "bat-entry.vhdx",
            bat,
            &e.to_le_bytes(),
            None,
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(im.read_at(&mut buf, 0).is_err());
    }
    // Invalid BAT state.
    let im = hostile(&src, d.path(), "bat-state.vhdx", bat + 8, &[5u8], None).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(im.read_at(&mut buf, MIB).is_err());
    // Entry past EOF reads zeros (no panic).
    let e = (1u64 << 40) | 6;
    let im = hostile(
        &src,
        d.path(),
        "bat-far.vhdx",
        bat + 16,
        &e.to_le_bytes(),
        None,
    )
    .unwrap();
    im.read_at(&mut buf, 2 * MIB).unwrap();
    // Metadata: huge entry count, item out of range.
    let md = u64::from_le_bytes(src[rt + 64..rt + 72].try_into().unwrap()) as usize;
    assert!(hostile(
        &src,
        d.path(),
        "md-count.vhdx",
        md + 10,
        &u16::MAX.to_le_bytes(),
        None
    )
    .is_err());
    assert!(hostile(
        &src,
        d.path(),
        "md-item.vhdx",
        md + 32 + 16,
        &u32::MAX.to_le_bytes(),
        None
    )
    .is_err());
    // Truncated file.
    let p = write_file(d.path(), "trunc.vhdx", &src[..300 << 10]);
    assert!(Image::open(&p, &open_opts(true),).is_err());
}

/// Read an image through libvhdi's `vhdimount` (FUSE); None when it cannot mount here.
fn vhdimount_read(img: &Path, dir: &Path) -> Option<Vec<u8>> {
    let mnt = dir.join("vhdimnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = run("vhdimount", &[img.to_str().unwrap(), mnt.to_str().unwrap()]);
    if !out.status.success() {
        eprintln!(
            "vhdimount failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    // With a parent, vhdiN are the chain from the base up: the image itself is the last.
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .map(|r| {
            r.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort_by_key(|n| (n.len(), n.clone()));
    let data = std::fs::read(mnt.join(names.last().map(String::as_str).unwrap_or("vhdi1")));
    let _ = run("fusermount3", &["-u", mnt.to_str().unwrap()]);
    let _ = run("umount", &["-l", mnt.to_str().unwrap()]);
    data.ok()
}

#[test]
fn libvhdi_reads_imgfs_differencing_and_4k_images() {
    let d = tmpdir();
    let size = 6 * MIB;
    let parent = qemu_create(d.path(), "p.vhdx", "block_size=1M", size);
    fill_with_qemu(d.path(), &parent, size, 21);
    let mut want = qemu_raw(&parent);
    let child = d.path().join("c.vhdx");
    create(&child, 0, &[("block_size", "1M")], Some(&parent));
    {
        let im = open(&child, false);
        for (off, len) in [
            (100u64, 10usize),
            (MIB + 4000, 3000),
            (3 * MIB, MIB as usize),
            (5 * MIB + 511, 2),
        ] {
            let buf = random_bytes(off + 1, len);
            im.write_at(&buf, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&buf);
        }
        im.close().unwrap();
    }
    let info = vhdiinfo(&child);
    eprintln!("{info}");
    if std::env::var("VHDX_KEEP").is_ok() {
        let _ = std::fs::create_dir_all("/tmp/vdbg");
        std::fs::copy(&child, "/tmp/vdbg/c.vhdx").unwrap();
        std::fs::copy(&parent, "/tmp/vdbg/p.vhdx").unwrap();
    }
    {
        let got = vhdimount_read(&child, d.path()).expect("vhdimount of the child");
        assert_same(&got, &want, "vhdimount of the differencing child");
    }
    let s4k = d.path().join("s4k.vhdx");
    create_4k(&s4k, size);
    let mut want = vec![0u8; size as usize];
    {
        let im = open(&s4k, false);
        engine_writes(&im, &mut want, 3, MIB);
        im.close().unwrap();
    }
    {
        let got = vhdimount_read(&s4k, d.path()).expect("vhdimount of the 4k image");
        assert_same(&got, &want, "vhdimount of the 4 KiB-sector image");
    }
}

/// Random corruption of every metadata structure (CRCs fixed up where they guard it), including
/// a dirty log: opening and reading must give errors or data, never a panic or a huge allocation.
#[test]
fn mutated_metadata_never_panics() {
    use imgfs::host::{FaultFile, SplitMix64};
    let d = tmpdir();
    let img = qemu_create(d.path(), "m.vhdx", "block_size=1M", 4 * MIB);
    qemu_io("vhdx", &img, &["write -P 3 0 1500k"]);
    // Leave a dirty log: entry durable, in-place BAT write not.
    let fault = FaultFile::new(std::fs::read(&img).unwrap());
    let opts = OpenOpts {
        format: Some("vhdx".into()),
        lock: false,
        ..OpenOpts::default()
    };
    let im = Image::open_host(fault.host_file(&img, true), &opts).unwrap();
    im.write_at(&[9u8; 5000], 3 * MIB).unwrap();
    im.flush().unwrap();
    let base = fault.durable();
    std::mem::forget(im);
    let rd = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let rt = 192 << 10;
    let (bat, md, log) = (rd(&base, rt + 32), rd(&base, rt + 64), MIB as usize);
    // (start, length, crc-guarded length or 0)
    let areas = [
        (64 << 10, 4096, 4096),
        (128 << 10, 4096, 4096),
        (rt, 64 << 10, 64 << 10),
        (md, 1024, 0),
        (md + (64 << 10), 64, 0),
        (bat, 64, 0),
        (log, 8192, 0),
    ];
    let mut rng = SplitMix64::new(4242);
    let mut opened = 0;
    for i in 0..400 {
        let mut b = base.clone();
        let (start, len, crc) = areas[i % areas.len()];
        for _ in 0..1 + rng.below(4) {
            let at = start + rng.below(len as u64) as usize;
            b[at] = match rng.below(3) {
                0 => 0xff,
                1 => 0,
                _ => rng.next_u64() as u8,
            };
        }
        if crc > 0 && rng.below(4) != 0 {
            b[start + 4..start + 8].fill(0);
            let c = crc32c::crc32c(&b[start..start + crc]);
            b[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
        }
        for read_only in [true, false] {
            let f = FaultFile::new(b.clone());
            let o = OpenOpts {
                read_only,
                ..opts.clone()
            };
            if let Ok(im) = Image::open_host(f.host_file(&img, !read_only), &o) {
                opened += 1;
                let mut buf = vec![0u8; (MIB / 2) as usize];
                for off in (0..4 * MIB).step_by(MIB as usize / 2) {
                    let _ = im.read_at(&mut buf, off);
                }
                if !read_only {
                    let _ = im.write_at(&buf[..3000], 2 * MIB + 100);
                    let _ = im.close();
                }
            }
        }
    }
    assert!(opened > 100, "most mutations should still open ({opened})");
}

#[test]
fn chain_of_4k_differencing_images() {
    let d = tmpdir();
    let size = 5 * MIB;
    let base = d.path().join("b4k.vhdx");
    create_4k(&base, size);
    let mut want = vec![0u8; size as usize];
    let write = |p: &Path, want: &mut Vec<u8>, seed: u64| {
        let im = open(p, false);
        for (off, len) in [
            (seed * 1000, 9000usize),
            (MIB + 4096 * seed + 7, 5000),
            (3 * MIB, 4096),
        ] {
            let buf = random_bytes(seed * 7 + off, len);
            im.write_at(&buf, off).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&buf);
        }
        im.close().unwrap();
    };
    write(&base, &mut want, 1);
    let mid = d.path().join("m4k.vhdx");
    create(&mid, 0, &[("block_size", "1M")], Some(&base));
    write(&mid, &mut want, 2);
    let top = d.path().join("t4k.vhdx");
    create(&top, 0, &[("block_size", "2M")], Some(&mid));
    write(&top, &mut want, 3);
    let im = open(&top, true);
    assert_eq!(im.info().details["logical_sector_size"], 4096);
    assert_same(&engine_read_all(&im), &want, "three-level chain");
    let got = vhdimount_read(&top, d.path()).expect("vhdimount of the chain");
    assert_same(&got, &want, "vhdimount of the three-level chain");
}

#[test]
fn block_size_256m_sparse_round_trip() {
    let d = tmpdir();
    let size = 600 * MIB;
    let img = qemu_create(d.path(), "big.vhdx", "block_size=256M", size);
    let expect = d.path().join("big.raw");
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .create(true)
        .truncate(true)
        .write(true)
        .open(&expect)
        .unwrap();
    raw.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let spots = [
        (5 * MIB + 3, 70_000usize),
        (256 * MIB - 1000, 5000),
        (599 * MIB, 4096),
    ];
    for (i, (off, len)) in spots.iter().enumerate() {
        let data = random_bytes(60 + i as u64, *len);
        // QEMU writes sector-aligned ranges; put the data where it lands.
        let aoff = off / 512 * 512;
        let alen = (*len as u64).div_ceil(512) * 512;
        let mut padded = data.clone();
        padded.resize(alen as usize, 0);
        write_file(d.path(), &format!("p{i}"), &padded);
        qemu_io(
            "vhdx",
            &img,
            &[&format!(
                "write -s {} {aoff} {alen}",
                d.path().join(format!("p{i}")).display()
            )],
        );
        raw.write_all_at(&padded, aoff).unwrap();
    }
    {
        let im = open(&img, false);
        for (off, len) in spots {
            let aoff = off / 512 * 512;
            let mut got = vec![0u8; len];
            im.read_at(&mut got, aoff).unwrap();
            let mut want = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&raw, &mut want, aoff).unwrap();
            assert_same(&got, &want, "256M block read");
        }
        for (i, off) in [300 * MIB + 17, 511 * MIB + 999].iter().enumerate() {
            let data = random_bytes(90 + i as u64, 300_000);
            im.write_at(&data, *off).unwrap();
            raw.write_all_at(&data, *off).unwrap();
        }
        im.write_zeroes(0, 256 * MIB, true).unwrap();
        raw.write_all_at(&vec![0u8; 256 << 20], 0).unwrap();
        im.close().unwrap();
    }
    assert_check_clean("vhdx", &img);
    assert_compare("vhdx", &img, &expect);
}

#[test]
fn parallel_writers_and_readers() {
    let d = tmpdir();
    let size = 32 * MIB;
    let img = qemu_create(d.path(), "par.vhdx", "block_size=1M", size);
    let im = std::sync::Arc::new(open(&img, false));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let im = im.clone();
            std::thread::spawn(move || {
                let mut rng = imgfs::host::SplitMix64::new(t);
                // Thread t owns every 4th 64 KiB stripe.
                let mut mine = vec![];
                for i in 0..60 {
                    let stripe = (rng.below(size / (256 << 10)) * 4 + t) * (64 << 10);
                    let data = random_bytes(t * 1000 + i, 64 << 10);
                    im.write_at(&data, stripe).unwrap();
                    mine.push((stripe, data));
                    if i % 10 == 9 {
                        im.flush().unwrap();
                    }
                    let (off, want) = &mine[rng.below(mine.len() as u64) as usize];
                    let mut got = vec![0u8; want.len()];
                    im.read_at(&mut got, *off).unwrap();
                    // A later write of the same stripe may have replaced it: compare with the last.
                    let last = mine.iter().rev().find(|(o, _)| o == off).unwrap();
                    assert_same(&got, &last.1, "parallel read");
                }
                mine
            })
        })
        .collect();
    let mut want = vec![0u8; size as usize];
    for t in threads {
        for (off, data) in t.join().unwrap() {
            want[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    assert_same(&engine_read_all(&im), &want, "after parallel writes");
    im.close().unwrap();
    drop(im);
    assert_check_clean("vhdx", &img);
    assert_same(&qemu_raw(&img), &want, "QEMU after parallel writes");
}
