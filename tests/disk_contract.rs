//! The exposed file behaves like a disk for ordinary tools: O_TRUNC opens (dd without
//! conv=notrunc, shell redirection) write in place; containers imgfs cannot serve are refused
//! rather than exposed as raw; Disk2VHD-style VHDX files (both headers with one sequence
//! number) open.

mod common;
use common::*;
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sh(script: &str) {
    ok("sh", &["-c", script]);
}

#[test]
fn o_trunc_opens_leave_size_and_contents_alone() {
    let t = tmpdir();
    let img = t.path().join("disk.qcow2");
    TestImage::build_at(&img, "qcow2").size("16M").qemu();
    let old = random_bytes(1, 16 << 20);
    let old_file = write_file(t.path(), "old.bin", &old);
    qemu_io(
        "qcow2",
        &img,
        &[&format!("write -s {} 0 16M", s(&old_file))],
    );
    let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
    let disk = m.file("disk.raw");
    let mut want = old.clone();

    // dd the way everybody writes a disk: no conv=notrunc.
    let a = random_bytes(2, 6 << 20);
    let a_file = write_file(t.path(), "a.bin", &a);
    ok(
        "dd",
        &[
            &format!("if={}", s(&a_file)),
            &format!("of={}", s(&disk)),
            "bs=4M",
            "status=none",
        ],
    );
    want[..a.len()].copy_from_slice(&a);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 << 20);
    assert_same(&std::fs::read(&disk).unwrap(), &want, "after dd");

    // Shell redirection: open(O_WRONLY|O_CREAT|O_TRUNC) on the existing file.
    let b = random_bytes(3, 1 << 20);
    let b_file = write_file(t.path(), "b.bin", &b);
    sh(&format!("cat '{}' > '{}'", s(&b_file), s(&disk)));
    want[..b.len()].copy_from_slice(&b);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 << 20);
    assert_same(&std::fs::read(&disk).unwrap(), &want, "after cat >");

    // truncate(2) to a smaller size is still refused; to the same size it is a no-op.
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let e = f.set_len(1 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    f.set_len(16 << 20).unwrap();
    drop(f);
    let out = run("truncate", &["-s", "0", s(&disk)]);
    assert!(!out.status.success());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 16 << 20);

    m.umount_ok();
    assert_check_clean("qcow2", &img);
    assert_compare_bytes("qcow2", &img, &want);
}

/// Hand-made files carrying a container's signature (formats qemu-img cannot create).
fn hand_made(dir: &Path) -> Vec<(std::path::PathBuf, &'static str)> {
    let mut out = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>, label: &'static str| {
        out.push((write_file(dir, name, &bytes), label));
    };
    let with_head = |magic: &[u8]| {
        let mut b = vec![0u8; 1 << 20];
        b[..magic.len()].copy_from_slice(magic);
        b
    };
    add("x.bochs", with_head(b"Bochs Virtual HD Image\0"), "Bochs");
    add(
        "x.cloop",
        with_head(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"),
        "cloop",
    );
    add("cowd.vmdk", with_head(b"COWD\x01\0\0\0"), "VMDK");
    let mut dmg = vec![0u8; 1 << 20];
    let at = dmg.len() - 512;
    dmg[at..at + 4].copy_from_slice(b"koly");
    add("x.dmg", dmg, "DMG");
    out
}

#[test]
fn containers_imgfs_cannot_serve_are_refused_unless_raw_is_asked_for() {
    let t = tmpdir();
    let d = t.path();
    let mut cases: Vec<(std::path::PathBuf, &str)> = Vec::new();
    let mut create = |name: &str, fmt: &str, opts: &[&str], label: &'static str| {
        let p = d.join(name);
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend_from_slice(opts);
        args.extend([s(&p), "8M"]);
        qemu_img(&args);
        cases.push((p, label));
    };
    // VMDK, VDI and VHD (dynamic, and fixed by its trailing footer) are served: tests/vmdk.rs,
    // vdi.rs, vhd.rs.
    create("x.hdd", "parallels", &[], "Parallels");
    create(
        "x.luks",
        "luks",
        &[
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "key-secret=s0,iter-time=10",
        ],
        "LUKS",
    );
    cases.extend(hand_made(d));
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    for (p, label) in &cases {
        for cmd in [&["info"][..], &["check"][..], &["mount"][..]] {
            let mut args = cmd.to_vec();
            args.push(s(p));
            if cmd[0] == "mount" {
                args.push(s(&mnt));
            }
            let out = run(IMGFS, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.contains(s(p)) && err.contains(label) && err.contains("cannot serve"),
                "{args:?}: {err}"
            );
        }
        assert!(!is_mounted(&mnt), "{}", p.display());
    }

    // --format raw exposes the container file itself, on purpose.
    let vdi = &cases[0].0;
    let m = Mount::new(&[vdi], &mnt, &["--format", "raw", "-r"]);
    assert_same(
        &std::fs::read(m.file("x.raw")).unwrap(),
        &std::fs::read(vdi).unwrap(),
        "vdi exposed as raw",
    );
    m.umount();

    // A directory mount skips them.
    let img = d.join("ok.qcow2");
    TestImage::build_at(&img, "qcow2").size("1M").qemu();
    let m = Mount::new(&[d], &mnt, &["-r"]);
    let names = m.names();
    assert_eq!(names, ["ok.raw"], "{names:?}");
    m.umount();
}

/// Header offsets in a VHDX file.
const H1: usize = 64 << 10;
const H2: usize = 128 << 10;

fn set_vhdx_checksum(h: &mut [u8]) {
    h[4..8].fill(0);
    let c = crc32c::crc32c(h);
    h[4..8].copy_from_slice(&c.to_le_bytes());
}

/// A QEMU-made VHDX with data, rewritten so both headers carry the current header's sequence
/// number (as Disk2VHD writes them); `edit` may change header 2 (its checksum is redone).
fn disk2vhd_like(
    dir: &Path,
    name: &str,
    edit: impl Fn(&mut [u8]),
) -> (std::path::PathBuf, Vec<u8>) {
    let t = TestImage::build(dir, name, "vhdx").size("64M").qemu();
    t.write_random(5, 3 << 20, &[(1 << 20, 3 << 20)]);
    let (img, data) = (t.path, random_bytes(5, 3 << 20));
    let mut b = std::fs::read(&img).unwrap();
    let seq = |b: &[u8], at: usize| u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap());
    let cur = if seq(&b, H1) >= seq(&b, H2) { H1 } else { H2 };
    let header: Vec<u8> = b[cur..cur + 4096].to_vec();
    b[H1..H1 + 4096].copy_from_slice(&header);
    b[H2..H2 + 4096].copy_from_slice(&header);
    edit(&mut b[H2..H2 + 4096]);
    set_vhdx_checksum(&mut b[H2..H2 + 4096]);
    assert_eq!(seq(&b, H1), seq(&b, H2));
    std::fs::write(&img, &b).unwrap();
    let mut want = vec![0u8; 64 << 20];
    want[1 << 20..4 << 20].copy_from_slice(&data);
    (img, want)
}

#[test]
fn vhdx_with_equal_header_sequence_numbers_opens_like_disk2vhd() {
    let t = tmpdir();
    // Identical headers, then headers differing only in file_write_guid: both open.
    for (name, edit) in [
        ("same.vhdx", (|_: &mut [u8]| {}) as fn(&mut [u8])),
        ("fwg.vhdx", |h: &mut [u8]| h[16] ^= 0xff),
    ] {
        let (img, mut want) = disk2vhd_like(t.path(), name, edit);
        assert_same(&open_read_all(&img, true), &want, name);
        let m = Mount::new(&[&img], &t.path().join("mnt"), &[]);
        let f = m.file(&name.replace(".vhdx", ".raw"));
        assert_same(&std::fs::read(&f).unwrap(), &want, name);
        let more = random_bytes(6, 1 << 20);
        pwrite(&f, 8 << 20, &more).unwrap();
        std::fs::File::open(&f).unwrap().sync_all().unwrap();
        want[8 << 20..9 << 20].copy_from_slice(&more);
        m.umount_ok();
        assert_check_clean("vhdx", &img);
        assert_compare_bytes("vhdx", &img, &want);
    }
}

#[test]
fn vhdx_with_equal_sequence_numbers_but_different_state_is_refused() {
    let t = tmpdir();
    for (name, edit, field) in [
        (
            "log.vhdx",
            (|h: &mut [u8]| h[48] ^= 1) as fn(&mut [u8]),
            "log_guid",
        ),
        ("dwg.vhdx", |h: &mut [u8]| h[32] ^= 1, "data_write_guid"),
    ] {
        let (img, _) = disk2vhd_like(t.path(), name, edit);
        let before = std::fs::read(&img).unwrap();
        for args in [
            vec!["info", s(&img)],
            vec!["mount", s(&img), s(&t.path().join("mnt"))],
        ] {
            std::fs::create_dir_all(t.path().join("mnt")).unwrap();
            let out = run(IMGFS, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains(s(&img)) && err.contains(field) && err.contains("sequence number"),
                "{err}"
            );
        }
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "refused file was changed"
        );
    }
}
