//! Shared helpers for end-to-end tests: QEMU as the oracle, temporary directories, and real
//! FUSE mounts that are always cleaned up.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    out
}

/// Run a command that must succeed; returns stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    ok("qemu-img", args)
}

/// `qemu-io -f FMT IMG -c CMD...`, each command must succeed.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt, img.to_str().unwrap()];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {args:?}: {out}"
    );
}

/// What QEMU says the guest sees: `qemu-img convert -O raw`.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("expect-raw");
    qemu_img(&["convert", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Exit code of `qemu-img check` (0 clean, 2 corrupt, 3 leaks) and its output.
pub fn qemu_check(fmt: &str, img: &Path) -> (i32, String) {
    let out = run("qemu-img", &["check", "-f", fmt, img.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check` must find no corruption and no leaks.
pub fn assert_check_clean(fmt: &str, img: &Path) {
    let (code, out) = qemu_check(fmt, img);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
}

/// `qemu-img compare` of an image with a raw file of the expected content.
pub fn assert_compare(fmt: &str, img: &Path, expect_raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fmt,
            "-F",
            "raw",
            img.to_str().unwrap(),
            expect_raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Compare two byte slices and report the first difference (not a 100 MiB assert dump).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// A scratch directory under /tmp (removed on drop).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("imgfs-test-").tempdir().unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Write `bytes` to a file and return its path (for `qemu-io -c 'write -s FILE ...'`).
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Read the whole guest through the engine (no FUSE).
pub fn engine_read_all(img: &imgfs::Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}
