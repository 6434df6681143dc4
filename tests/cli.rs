//! The command line around the mount, with qemu-img as the oracle: create, check/repair, info,
//! snapshot -l, and their exit codes.

mod common;
use common::imgfs_cmd as imgfs;
use common::*;
use serde_json::Value;
use std::path::Path;

#[test]
fn create_qcow2_option_space_passes_qemu_check_and_shows_geometry() {
    let t = tmpdir();
    let cases: &[(&str, u64, &str, bool, u64, bool)] = &[
        // options, cluster, compat, lazy, refcount bits, extended l2
        ("", 65536, "1.1", false, 16, false),
        (
            "cluster_size=4K,compat=0.10",
            4096,
            "0.10",
            false,
            16,
            false,
        ),
        (
            "cluster_size=2M,lazy_refcounts=on",
            2 << 20,
            "1.1",
            true,
            16,
            false,
        ),
        (
            "cluster_size=512,refcount_bits=1",
            512,
            "1.1",
            false,
            1,
            false,
        ),
        (
            "refcount_bits=64,extended_l2=on",
            65536,
            "1.1",
            false,
            64,
            true,
        ),
        (
            "preallocation=metadata,cluster_size=64K",
            65536,
            "1.1",
            false,
            16,
            false,
        ),
    ];
    for (i, &(opts, cluster, compat, lazy, rbits, ext)) in cases.iter().enumerate() {
        let make = |name: String| {
            TestImage::build(t.path(), &name, "qcow2")
                .opts(opts)
                .size("1000M")
        };
        let p = make(format!("c{i}.qcow2")).cli().path;
        assert_check_clean("qcow2", &p);
        let info = qemu_info(&p);
        assert_eq!(info["virtual-size"], 1000 << 20, "{opts}");
        assert_eq!(info["cluster-size"], cluster, "{opts}");
        let spec = &info["format-specific"]["data"];
        assert_eq!(spec["compat"], compat, "{opts}");
        if compat == "1.1" {
            assert_eq!(spec["lazy-refcounts"], lazy, "{opts}");
            assert_eq!(spec["refcount-bits"], rbits, "{opts}");
            assert_eq!(spec["extended-l2"], ext, "{opts}");
        }
        // The same writes into a qemu-made twin read the same through imgfs.
        let twin = make(format!("q{i}.qcow2")).qemu().path;
        for img in [&p, &twin] {
            qemu_io(
                "qcow2",
                img,
                &["write -P 0x33 1000 70000", "write -z 5M 1M"],
            );
        }
        assert_eq!(qemu_raw(&p), qemu_raw(&twin), "{opts}");
    }
}

#[test]
fn create_with_backing_takes_its_size_and_refuses_bad_input() {
    let t = tmpdir();
    let base = t.path().join("base.qcow2");
    let over = t.path().join("over.qcow2");
    TestImage::build_at(&base, "qcow2").size("77M").qemu();
    qemu_io("qcow2", &base, &["write -P 0x44 0 1M"]);
    let (code, _, err) = imgfs(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        over.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let info = qemu_info(&over);
    assert_eq!(info["virtual-size"], 77 << 20);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_check_clean("qcow2", &over);
    assert_eq!(qemu_raw(&over), qemu_raw(&base));
    // Bad input: unknown option, unknown format, no size, protocol backing name.
    for (args, want) in [
        (
            vec!["create", "-f", "qcow2", "-o", "bogus=1", "x.qcow2", "1M"],
            "bogus",
        ),
        (
            vec!["create", "-f", "vmdk9", "x.img", "1M"],
            "unknown format",
        ),
        (vec!["create", "-f", "qcow2", "x.qcow2"], "size"),
        (
            vec!["create", "-f", "qcow2", "-b", "nbd://h/x", "x.qcow2", "1M"],
            "not a plain local path",
        ),
    ] {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let last = args.iter().rposition(|a| a.starts_with('x')).unwrap();
        args[last] = t.path().join(&args[last]).display().to_string();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = imgfs(&a);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Set the 16-bit refcount of host cluster `cluster` in a fresh qcow2 (64K clusters).
fn poke_refcount(img: &Path, cluster: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(img).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let rt = be64(48) as usize;
    let block = be64(rt);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&value.to_be_bytes(), block + 2 * cluster)
        .unwrap();
}

#[test]
fn check_and_repair_agree_with_qemu_img() {
    let t = tmpdir();
    let img = t.path().join("c.qcow2");
    let make = || {
        TestImage::build_at(&img, "qcow2").size("16M").qemu();
        qemu_io("qcow2", &img, &["write -P 1 0 256k"]);
    };
    make();
    let (code, out, _) = imgfs(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No errors"), "{out}");
    // A leak: a cluster past everything with refcount 1.
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len + 65536)
        .unwrap();
    poke_refcount(&img, len / 65536, 1);
    assert_eq!(qemu_check("qcow2", &img).0, 3);
    let (code, out, _) = imgfs(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 3, "{out}");
    let (code, out, err) = imgfs(&["check", "--json", img.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["leaks"], 1);
    let (code, out, _) = imgfs(&["check", "-r", "leaks", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(qemu_check("qcow2", &img).0, 0);
    // A corruption: the refcount of a data cluster dropped to 0.
    make();
    let data_cluster = {
        let bytes = std::fs::read(&img).unwrap();
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let l1 = be64(40) as usize;
        let l2 = (be64(l1) & 0x00ff_ffff_ffff_fe00) as usize;
        (be64(l2) & 0x00ff_ffff_ffff_fe00) / 65536
    };
    poke_refcount(&img, data_cluster, 0);
    assert_eq!(qemu_check("qcow2", &img).0, 2);
    let (code, out, _) = imgfs(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    let (code, out, _) = imgfs(&["check", "-r", "all", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(qemu_check("qcow2", &img).0, 0);
    assert_eq!(qemu_raw(&img)[..256 << 10], vec![1u8; 256 << 10][..]);
    // raw cannot be checked: qemu-img's exit code 63.
    let raw = write_file(t.path(), "r.img", &[0u8; 4096]);
    assert_eq!(imgfs(&["check", raw.to_str().unwrap()]).0, 63);
}

#[test]
fn info_and_snapshot_list_match_qemu() {
    let t = tmpdir();
    let base = t.path().join("b.qcow2");
    let img = t.path().join("i.qcow2");
    TestImage::build_at(&base, "qcow2").size("10M").qemu();
    qcow2_overlay(&img, "b.qcow2");
    qemu_io("qcow2", &img, &["write 0 64k"]);
    qemu_img(&["snapshot", "-c", "first", img.to_str().unwrap()]);
    qemu_img(&["snapshot", "-c", "second", img.to_str().unwrap()]);
    let (code, out, err) = imgfs(&["info", "--json", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    let q = qemu_info(&img);
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["virtual_size"], q["virtual-size"]);
    assert_eq!(j["cluster_size"], q["cluster-size"]);
    assert_eq!(j["backing_file"], "b.qcow2");
    assert_eq!(j["backing_chain"][0]["format"], "qcow2");
    assert_eq!(j["snapshots"].as_array().unwrap().len(), 2);
    let (_, text, _) = imgfs(&["info", img.to_str().unwrap()]);
    assert!(
        text.contains("backing file: b.qcow2") && text.contains("virtual size: 10 MiB"),
        "{text}"
    );
    // snapshot -l rows: same ids, names and dates as qemu-img's.
    let (code, mine, _) = imgfs(&["snapshot", "-l", img.to_str().unwrap()]);
    assert_eq!(code, 0);
    let theirs = qemu_img(&["snapshot", "-l", img.to_str().unwrap()]);
    let rows = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .skip(2)
            .map(|l| l.split_whitespace().take(6).map(str::to_string).collect())
            .collect()
    };
    let (m, q) = (rows(&mine), rows(&theirs));
    assert_eq!(m.len(), 2);
    for (a, b) in m.iter().zip(&q) {
        assert_eq!(a[..2], b[..2], "id and tag");
        assert_eq!(a[4..6], b[4..6], "date");
    }
}

#[test]
fn create_other_formats_pass_qemu_and_check_agrees() {
    let t = tmpdir();
    let cases: &[(&str, &str, &str)] = &[
        ("qed", "cluster_size=64K,table_size=4", "cluster-size"),
        ("qed", "", "cluster-size"),
        ("vhdx", "block_size=8M,log_size=1M", "cluster-size"),
        ("vhdx", "subformat=fixed,block_size=1M", "cluster-size"),
        ("qcow", "", "cluster-size"),
        ("raw", "preallocation=falloc", "virtual-size"),
    ];
    for (i, &(fmt, opts, _)) in cases.iter().enumerate() {
        let p = TestImage::build(t.path(), &format!("o{i}.{fmt}"), fmt)
            .opts(opts)
            .size("48M")
            .cli()
            .path;
        let info = qemu_info(&p);
        assert_eq!(info["format"], fmt, "{opts}");
        assert_eq!(info["virtual-size"], 48 << 20, "{fmt} {opts}");
        match fmt {
            "qed" if opts.contains("64K") => assert_eq!(info["cluster-size"], 65536),
            "vhdx" if opts.contains("8M") => assert_eq!(info["cluster-size"], 8 << 20),
            _ => {}
        }
        if fmt == "qed" || fmt == "vhdx" {
            assert_check_clean(fmt, &p);
            let (code, out, _) = imgfs(&["check", p.to_str().unwrap()]);
            assert_eq!(code, 0, "imgfs check {fmt}: {out}");
        }
        qemu_io(fmt, &p, &["write -P 0x21 1M 128k"]);
        let mut want = vec![0u8; 48 << 20];
        want[1 << 20..(1 << 20) + (128 << 10)].fill(0x21);
        assert_eq!(qemu_raw(&p), want, "{fmt} {opts}");
    }
}

#[test]
fn vhdx_differencing_child_from_the_cli() {
    let t = tmpdir();
    let parent = TestImage::build(t.path(), "parent.vhdx", "vhdx")
        .opt("block_size", "1M")
        .size("16M")
        .qemu();
    parent.io(&["write -P 0x70 0 3M"]);
    let parent = parent.path;
    let child = t.path().join("child.vhdx");
    let (code, _, err) = imgfs(&[
        "create",
        "-f",
        "vhdx",
        "-b",
        "parent.vhdx",
        child.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, info, _) = imgfs(&["info", "--json", child.to_str().unwrap()]);
    let j: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(j["virtual_size"], 16 << 20);
    assert_eq!(j["backing_chain"][0]["format"], "vhdx");
    // Mount the child: parent data shows through; writes land in the child only.
    let parent_before = std::fs::read(&parent).unwrap();
    let m = Mount::new(&[&child], &t.path().join("mnt"), &[]);
    let f = m.file("child.raw");
    assert_eq!(pread(&f, 0, 4096), vec![0x70; 4096]);
    pwrite(&f, 1000, &[0x71; 5000]).unwrap();
    let mut want = vec![0u8; 16 << 20];
    want[..3 << 20].fill(0x70);
    want[1000..6000].fill(0x71);
    assert_same(&std::fs::read(&f).unwrap(), &want, "child through mount");
    m.umount_ok();
    assert_eq!(std::fs::read(&parent).unwrap(), parent_before);
    if run("which", &["vhdiinfo"]).status.success() {
        let out = ok("vhdiinfo", &[child.to_str().unwrap()]);
        assert!(
            out.to_lowercase().contains("differential") || out.contains("Parent"),
            "{out}"
        );
    }
    // Writing the parent afterwards gives it a new data-write GUID: the child is refused.
    qemu_io("vhdx", &parent, &["write -P 0x72 0 4096"]);
    let e = Mount::try_new(&[&child], &t.path().join("mnt"), &[])
        .err()
        .unwrap();
    assert!(
        e.contains("parent changed since the child was created"),
        "{e}"
    );
}

/// `imgfs info IMG | head -1`: a reader that goes away ends the command quietly (SIGPIPE), with
/// no panic message.
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let t = tmpdir();
    let img = t.path().join("p.qcow2");
    TestImage::build_at(&img, "qcow2").size("1G").qemu();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(IMGFS)
        .args(["info", img.to_str().unwrap()])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn_child()
        .and_then(|c| c.wait_with_output())
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{err}");
}
