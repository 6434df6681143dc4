//! VHD (QEMU's vpc) end to end: fixed and dynamic images from qemu-img read equal to
//! `qemu-img convert -f vpc`, the disk-size rule per creator application matches QEMU, writes
//! through the engine pass `qemu-img compare` (QEMU cannot check vpc: exit 63), differencing
//! disks made by `imgfs create -b` read back through libvhdi too, and `check` finds and repairs
//! damage.

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
            format: Some("vpc".into()),
            ..OpenOpts::default()
        },
    )
    .unwrap()
}

/// Expected guest bytes: `qemu-img convert -f vpc` (a fixed VHD probes as raw).
fn vpc_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("expect-raw");
    qemu_img(&[
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

fn qemu_size(img: &Path) -> u64 {
    let out = qemu_img(&["info", "-f", "vpc", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

fn qemu_create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        opts,
        p.to_str().unwrap(),
        &size.to_string(),
    ]);
    p
}

/// Random data at unaligned sector offsets, some spanning 2 MiB blocks, plus a pattern.
fn fill_with_qemu(dir: &Path, img: &Path, size: u64, seed: u64) {
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let mut cmds = vec![];
    for i in 0..6 {
        let len = 512 * (1 + rng.below(3000));
        let off = rng.below(size - len) / 512 * 512;
        let f = write_file(
            dir,
            &format!("r{seed}-{i}"),
            &random_bytes(seed * 10 + i, len as usize),
        );
        cmds.push(format!("write -s {} {off} {len}", f.display()));
    }
    cmds.push(format!("write -P 0x5a {} 4096", size / 512 * 512 - 4096));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("vpc", img, &refs);
}

fn imgfs(args: &[&str]) -> std::process::Output {
    run(IMGFS, args)
}

#[test]
fn reads_equal_qemu_fixed_and_dynamic() {
    let d = tmpdir();
    let cases = [
        ("subformat=dynamic", 40 * MIB + 12345),
        ("subformat=dynamic,force_size=on", 33 * MIB),
        ("subformat=fixed", 9 * MIB + 512),
        ("subformat=fixed,force_size=on", 12 * MIB),
    ];
    for (i, (opts, size)) in cases.iter().enumerate() {
        let img = qemu_create(d.path(), &format!("r{i}.vhd"), opts, *size);
        let qsize = qemu_size(&img);
        fill_with_qemu(d.path(), &img, qsize, i as u64 + 1);
        let want = vpc_raw(&img);
        let im = open(&img, true);
        assert_eq!(im.size(), qsize, "{opts}");
        assert_same(&engine_read_all(&im), &want, opts);
    }
}

/// Rewrite both footer copies of `img` with `patch` applied (and the checksum recomputed).
fn patch_footer(img: &Path, patch: impl Fn(&mut [u8])) {
    let mut b = std::fs::read(img).unwrap();
    let len = b.len();
    for at in [0, len - 512] {
        if &b[at..at + 8] != b"conectix" {
            continue;
        }
        let f = &mut b[at..at + 512];
        patch(f);
        f[64..68].fill(0);
        let sum = f.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(img, b).unwrap();
}

#[test]
fn disk_size_rule_per_creator_matches_qemu() {
    let d = tmpdir();
    // force_size keeps 3 MiB + 7 sectors exactly; the geometry below describes less.
    let size = 3 * MIB + 7 * 512;
    let (c, h, s) = (90u16, 4u8, 17u8);
    let chs = c as u64 * h as u64 * s as u64 * 512;
    for sub in ["dynamic", "fixed"] {
        for app in [
            *b"vpc ", *b"qemu", *b"qem2", *b"win ", *b"d2v ", *b"CTXS", *b"tap\0", *b"wa\0\0",
            *b"xyz ",
        ] {
            let img = qemu_create(
                d.path(),
                "c.vhd",
                &format!("subformat={sub},force_size=on"),
                size,
            );
            qemu_io(
                "vpc",
                &img,
                &[
                    "write -P 0x77 0 3M",
                    &format!("write -P 0x78 {} 3584", 3 * MIB),
                ],
            );
            patch_footer(&img, |f| {
                f[28..32].copy_from_slice(&app);
                f[56..58].copy_from_slice(&c.to_be_bytes());
                f[58] = h;
                f[59] = s;
            });
            let what = format!("{sub} {:?}", String::from_utf8_lossy(&app));
            let qsize = qemu_size(&img);
            assert!(qsize == size || qsize == chs, "{what}: qemu says {qsize}");
            let im = open(&img, true);
            assert_eq!(im.size(), qsize, "{what}");
            assert_same(&engine_read_all(&im), &vpc_raw(&img), &what);
            drop(im);
            std::fs::remove_file(&img).unwrap();
        }
    }
}

/// A dynamic VHD's BAT entries (sector offsets of each block's bitmap); empty for a fixed VHD.
fn bat_entries(img: &Path) -> Vec<u32> {
    let b = std::fs::read(img).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let be32 = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    if &b[..8] != b"conectix" || be32(60) == 2 {
        return vec![];
    }
    let h = be64(16);
    let (bat, n) = (be64(h + 16), be32(h + 28) as usize);
    (0..n).map(|i| be32(bat + i * 4)).collect()
}

/// Blocks imgfs allocated (entries unallocated before) have their data, after the 512-byte
/// bitmap of a 2 MiB block, on a 4 KiB boundary.
fn assert_new_blocks_aligned(before: &[u32], after: &[u32]) {
    let mut new = 0;
    for (i, (&b, &a)) in before.iter().zip(after).enumerate() {
        if b == u32::MAX && a != u32::MAX {
            new += 1;
            assert_eq!((a as u64 * 512 + 512) % 4096, 0, "block {i} at sector {a}");
        }
    }
    assert!(before.is_empty() || new > 0, "no block allocated");
}

#[test]
fn writes_pass_qemu_compare_and_imgfs_check() {
    let d = tmpdir();
    for (i, opts) in ["subformat=dynamic", "subformat=fixed"].iter().enumerate() {
        let img = qemu_create(d.path(), &format!("w{i}.vhd"), opts, 24 * MIB);
        fill_with_qemu(d.path(), &img, qemu_size(&img), 7 + i as u64);
        let mut want = vpc_raw(&img);
        let before = bat_entries(&img);
        let im = open(&img, false);
        write_block_pattern(&im, &mut want, 100 * i as u64, 2 * MIB, 6 * MIB);
        im.close().unwrap();
        drop(im);
        assert_new_blocks_aligned(&before, &bat_entries(&img));
        assert_compare_bytes("vpc", &img, &want);
        assert_eq!(qemu_check("vpc", &img).0, 63, "qemu-img cannot check vpc");
        ok(IMGFS, &["check", "-f", "vpc", img.to_str().unwrap()]);
        let im = open(&img, true);
        assert_same(&engine_read_all(&im), &want, "reopened");
    }
}

#[test]
fn create_sizes_match_qemu_and_azure_rule_is_told() {
    let d = tmpdir();
    for size in [10 * MIB, 10 * MIB + 512, 130 * 1000 * 1000, 3 << 30] {
        for opts in [
            "subformat=dynamic",
            "subformat=fixed",
            "subformat=dynamic,force_size=on",
        ] {
            let q = qemu_create(d.path(), "q.vhd", opts, size);
            let ours = d.path().join("o.vhd");
            let _ = std::fs::remove_file(&ours);
            let out = imgfs(&[
                "create",
                "-f",
                "vhd",
                "-o",
                opts,
                ours.to_str().unwrap(),
                &size.to_string(),
            ]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(qemu_size(&ours), qemu_size(&q), "{size} {opts}");
            let fixed = opts.contains("fixed");
            let warned = String::from_utf8_lossy(&out.stderr).contains("Azure");
            assert_eq!(
                warned,
                fixed && !qemu_size(&ours).is_multiple_of(MIB),
                "{size} {opts}"
            );
            if size < 20 * MIB {
                assert_compare_bytes("vpc", &ours, &vec![0; qemu_size(&ours) as usize]);
            }
            std::fs::remove_file(&q).unwrap();
        }
    }
}

#[test]
fn differencing_reads_parent_and_libvhdi_agrees() {
    let d = tmpdir();
    let base = qemu_create(d.path(), "base.vhd", "subformat=dynamic", 20 * MIB);
    fill_with_qemu(d.path(), &base, qemu_size(&base), 3);
    let base_bytes = std::fs::read(&base).unwrap();
    let child = d.path().join("child.vhd");
    let out = imgfs(&[
        "create",
        "-f",
        "vpc",
        "-b",
        "base.vhd",
        child.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = vpc_raw(&base);
    let im = open(&child, false);
    assert_same(&engine_read_all(&im), &want, "child before writes");
    write_block_pattern(&im, &mut want, 40, 2 * MIB, 6 * MIB);
    im.close().unwrap();
    drop(im);
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "parent changed");
    assert_same(&open_read_all_vpc(&child), &want, "child after writes");
    let info = ok("vhdiinfo", &[child.to_str().unwrap()]);
    assert!(
        info.contains("Differential") && info.contains("base.vhd"),
        "{info}"
    );
    let m = d.path().join("m");
    std::fs::create_dir(&m).unwrap();
    ok(
        "vhdimount",
        &[
            "-X",
            "allow_root",
            child.to_str().unwrap(),
            m.to_str().unwrap(),
        ],
    );
    let _g = MountGuard(m.clone());
    let got = std::fs::read(m.join("vhdi2")).unwrap();
    assert_same(&got, &want, "libvhdi's view of the child");
}

fn open_read_all_vpc(p: &Path) -> Vec<u8> {
    let im = open(p, true);
    engine_read_all(&im)
}

#[test]
fn differencing_parent_found_by_locators_and_checked_by_id() {
    let d = tmpdir();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = qemu_create(&sub, "base.vhd", "subformat=dynamic", 8 * MIB);
    qemu_io("vpc", &base, &["write -P 0x31 0 1M"]);
    let child = d.path().join("child.vhd");
    let out = imgfs(&[
        "create",
        "-f",
        "vpc",
        "-b",
        "sub/base.vhd",
        child.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&open_read_all_vpc(&child)[..4], &[0x31; 4]);
    // Moved together into another directory: the relative locator still finds the parent.
    let d2 = tmpdir();
    std::fs::create_dir(d2.path().join("sub")).unwrap();
    std::fs::rename(&base, d2.path().join("sub/base.vhd")).unwrap();
    std::fs::rename(&child, d2.path().join("child.vhd")).unwrap();
    let child = d2.path().join("child.vhd");
    assert_eq!(&open_read_all_vpc(&child)[..4], &[0x31; 4]);
    // A parent with the same name but another unique id is refused.
    let other = qemu_create(
        &d2.path().join("sub"),
        "base.vhd",
        "subformat=dynamic",
        8 * MIB,
    );
    let e = Image::open(
        &child,
        &OpenOpts {
            read_only: true,
            ..OpenOpts::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("unique id"), "{e}");
    // No parent at all: a clear error naming what was tried.
    std::fs::remove_file(&other).unwrap();
    let e = Image::open(
        &child,
        &OpenOpts {
            read_only: true,
            ..OpenOpts::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("base.vhd"), "{e}");
}

#[test]
fn check_finds_and_repairs_damage() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "k.vhd", "subformat=dynamic", 16 * MIB);
    qemu_io(
        "vpc",
        &img,
        &["write -P 1 0 1M", "write -P 2 4M 1M", "write -P 3 8M 1M"],
    );
    let p = img.to_str().unwrap();
    let mut b = std::fs::read(&img).unwrap();
    let bat = 1536;
    // Entry 2 duplicates entry 0's block; entry 3 points past the file; offset-0 footer damaged.
    let e0: [u8; 4] = b[bat..bat + 4].try_into().unwrap();
    b[bat + 8..bat + 12].copy_from_slice(&e0);
    b[bat + 12..bat + 16].copy_from_slice(&0x00ff_ff00u32.to_be_bytes());
    b[100] ^= 0xff;
    std::fs::write(&img, &b).unwrap();
    let out = imgfs(&["check", "-f", "vpc", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("used twice") && text.contains("outside") && text.contains("offset 0"),
        "{text}"
    );
    ok(IMGFS, &["check", "-r", "all", "-f", "vpc", p]);
    ok(IMGFS, &["check", "-f", "vpc", p]);
    // QEMU reads the repaired image; the unharmed blocks kept their data.
    let raw = vpc_raw(&img);
    assert!(raw[..MIB as usize].iter().all(|&x| x == 1));
    assert!(raw[8 * MIB as usize..9 * MIB as usize]
        .iter()
        .all(|&x| x == 3));
    assert!(raw[4 * MIB as usize..5 * MIB as usize]
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn mounted_dynamic_vhd_writes_and_remounts() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "m.vhd", "subformat=dynamic", 12 * MIB);
    fill_with_qemu(d.path(), &img, qemu_size(&img), 11);
    let mut want = vpc_raw(&img);
    let mnt = d.path().join("mnt");
    let m = Mount::new(&[&img], &mnt, &[]);
    let f = m.file("m.raw");
    assert_same(&std::fs::read(&f).unwrap(), &want, "mounted");
    for (i, &(off, len)) in [
        (100u64, 7000usize),
        (2 * MIB - 3, 9),
        (5 * MIB, MIB as usize),
    ]
    .iter()
    .enumerate()
    {
        let data = random_bytes(50 + i as u64, len);
        pwrite(&f, off, &data).unwrap();
        want[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let (ok_, err) = m.umount();
    assert!(ok_, "{err}");
    assert_compare_bytes("vpc", &img, &want);
}

/// What a power cut between moving the footer and storing the new block's BAT entry leaves:
/// a block (bitmap + some data) that no entry references, then the footer.
fn leak_one_block(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let at = b.len() - 512;
    let footer = b[at..].to_vec();
    let unit = 512 + 2 * MIB as usize;
    b.resize(at + unit + 512, 0);
    b[at..at + 512].fill(0xff);
    b[at + 512..at + 512 + 8192].fill(0x77);
    b[at + unit..].copy_from_slice(&footer);
    std::fs::write(img, &b).unwrap();
}

fn check_code(img: &Path, repair: bool) -> (Option<i32>, String) {
    let p = img.to_str().unwrap();
    let out = if repair {
        imgfs(&["check", "-r", "all", "-f", "vpc", p])
    } else {
        imgfs(&["check", "-f", "vpc", p])
    };
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
    )
}

#[test]
fn check_reports_and_repairs_leaked_blocks() {
    let d = tmpdir();
    let img = qemu_create(d.path(), "leak.vhd", "subformat=dynamic", 16 * MIB);
    qemu_io("vpc", &img, &["write -P 1 0 1M", "write -P 3 8M 1M"]);
    let mut want = vpc_raw(&img);
    let clean_len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(check_code(&img, false).0, Some(0));

    // Before the footer: repair moves the footer back and cuts the file.
    leak_one_block(&img);
    let (code, text) = check_code(&img, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("1 leaked block") && text.contains("before the footer"),
        "{text}"
    );
    assert_compare_bytes("vpc", &img, &want);
    let (code, text) = check_code(&img, true);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), clean_len);
    assert_eq!(check_code(&img, false).0, Some(0));
    assert_compare_bytes("vpc", &img, &want);

    // Between blocks (a block allocated after the leak): repair punches it out.
    leak_one_block(&img);
    let im = open(&img, false);
    let data = random_bytes(9, 4096);
    im.write_at(&data, 12 * MIB).unwrap();
    im.close().unwrap();
    drop(im);
    want[12 * MIB as usize..12 * MIB as usize + 4096].copy_from_slice(&data);
    let (code, text) = check_code(&img, false);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("1 leaked block") && !text.contains("before the footer"),
        "{text}"
    );
    let held = std::fs::metadata(&img).unwrap();
    assert_eq!(check_code(&img, true).0, Some(0));
    assert_eq!(check_code(&img, false).0, Some(0));
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&img).unwrap().blocks() < held.blocks(),
        "space not freed"
    );
    assert_compare_bytes("vpc", &img, &want);
    assert_same(&vpc_raw(&img), &want, "QEMU's view after repair");
}
