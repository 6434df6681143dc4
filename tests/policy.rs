//! The safety policy, end to end: what an image header may name, chain depth, encryption, and a
//! read-only mount never writing the file (even an image that would need repair).

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;

#[test]
fn backing_names_must_be_local_and_inside_the_image_directory() {
    let t = tmpdir();
    let outside = t.path().join("outside");
    let inside = t.path().join("vms");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&inside).unwrap();
    let base = outside.join("base.qcow2");
    TestImage::build_at(&base, "qcow2")
        .size("4M")
        .qemu()
        .io(&["write -P 0x42 0 64k"]);
    let top = TestImage::build(&inside, "top.qcow2", "qcow2")
        .backing("../outside/base.qcow2", Some("qcow2"))
        .unchecked()
        .size("4M")
        .qemu()
        .path;
    let mnt = t.path().join("mnt");
    let e = Mount::try_new(&[&top], &mnt, &[]).err().unwrap();
    assert!(
        e.contains("outside the image's directory") && e.contains("--allow-backing-outside"),
        "{e}"
    );
    let m = Mount::new(&[&top], &mnt, &["--allow-backing-outside"]);
    assert_eq!(pread(&m.file("top.raw"), 0, 4096), vec![0x42; 4096]);
    drop(m);
    // A protocol or json: backing name is never followed, even when allowed outside.
    for name in [
        "json:{\"driver\":\"file\",\"filename\":\"/etc/passwd\"}",
        "nbd://127.0.0.1/x",
    ] {
        let evil = TestImage::build(&inside, "evil.qcow2", "qcow2")
            .backing(name, Some("raw"))
            .unchecked()
            .size("4M")
            .qemu()
            .path;
        let e = Mount::try_new(&[&evil], &mnt, &["--allow-backing-outside"])
            .err()
            .unwrap();
        assert!(e.contains("not a plain local path"), "{name}: {e}");
    }
}

#[test]
fn backing_chains_have_a_depth_limit() {
    let t = tmpdir();
    let mut prev = t.path().join("c0.qcow2");
    TestImage::build_at(&prev, "qcow2").size("1M").qemu();
    for i in 1..=20 {
        let b = prev.file_name().unwrap().to_str().unwrap().to_string();
        prev = TestImage::build(t.path(), &format!("c{i}.qcow2"), "qcow2")
            .backing(&b, Some("qcow2"))
            .qemu()
            .path;
    }
    let e = Mount::try_new(&[&prev], &t.path().join("mnt"), &[])
        .err()
        .unwrap();
    assert!(e.contains("backing chain deeper than"), "{e}");
    // A chain of a sane length mounts.
    let ok_top = t.path().join("c10.qcow2");
    let m = Mount::new(&[&ok_top], &t.path().join("mnt"), &["-r"]);
    assert_eq!(std::fs::metadata(m.file("c10.raw")).unwrap().len(), 1 << 20);
}

#[test]
fn encrypted_images_are_refused_clearly() {
    let t = tmpdir();
    let img = t.path().join("enc.qcow2");
    let out = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=hunter2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            img.to_str().unwrap(),
            "4M",
        ],
    );
    if !out.status.success() {
        eprintln!("qemu-img cannot make encrypted images here; skipped");
        return;
    }
    let e = Mount::try_new(&[&img], &t.path().join("mnt"), &[])
        .err()
        .unwrap();
    assert!(
        e.contains("enc.qcow2") && e.to_lowercase().contains("encrypt"),
        "{e}"
    );
}

#[test]
fn read_only_mounts_never_write_even_images_that_need_repair() {
    let t = tmpdir();
    // A lazy-refcounts qcow2 left dirty by a killed qemu-io, and a QED image with need-check set.
    let q = TestImage::build(t.path(), "dirty.qcow2", "qcow2")
        .opt("lazy_refcounts", "on")
        .size("8M")
        .qemu()
        .path;
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x17 0 1M",
            "-c",
            "abort",
            q.to_str().unwrap(),
        ],
    );
    assert!(
        !out.status.success(),
        "qemu-io abort leaves the image dirty"
    );
    let d = TestImage::build(t.path(), "nc.qed", "qed")
        .size("8M")
        .qemu();
    d.io(&["write -P 0x18 0 64k"]);
    let d = d.path;
    {
        // QED header: `features` (u64 LE) at byte 16; QED_F_NEED_CHECK = 0x02.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&d)
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 16).unwrap();
        let features = u64::from_le_bytes(b) | 0x02;
        f.write_all_at(&features.to_le_bytes(), 16).unwrap();
    }
    for (img, name, byte) in [(&q, "dirty.raw", 0x17u8), (&d, "nc.raw", 0x18)] {
        let before = std::fs::read(img).unwrap();
        let mtime = std::fs::metadata(img).unwrap().mtime_nsec();
        let m = Mount::new(&[img], &t.path().join("mnt"), &["--read-only"]);
        assert_eq!(pread(&m.file(name), 0, 4096), vec![byte; 4096], "{name}");
        assert!(m.umount().0);
        assert_eq!(
            std::fs::read(img).unwrap(),
            before,
            "{name}: read-only mount changed the file"
        );
        assert_eq!(
            std::fs::metadata(img).unwrap().mtime_nsec(),
            mtime,
            "{name}: mtime changed"
        );
    }
}
