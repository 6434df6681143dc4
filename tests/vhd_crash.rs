//! Differencing VHD crash safety: power cuts (crash simulator) while writing into a child made
//! by `imgfs create -b` over a dynamic parent, with a two-table cache so BAT pages and sector
//! bitmaps are also written back by eviction. Every fsync'd byte must survive, the parent must
//! stay untouched, and `imgfs check -r all` must leave the crashed child clean (a cut inside an
//! allocation may leak the block before the footer; nothing worse). (Plain dynamic and fixed
//! VHDs are cut in tests/powercut.rs.)

mod common;

use common::*;

#[test]
fn crash_differencing_child() {
    let d = tmpdir();
    let base = d.path().join("base.vhd");
    qemu_img(&["create", "-q", "-f", "vpc", base.to_str().unwrap(), "6M"]);
    let data = write_file(d.path(), "seed.bin", &random_bytes(3, 3 << 20));
    qemu_io(
        "vpc",
        &base,
        &[&format!("write -s {} 0 3M", data.display())],
    );
    let base_bytes = std::fs::read(&base).unwrap();
    let child = d.path().join("child.vhd");
    ok(
        IMGFS,
        &[
            "create",
            "-f",
            "vpc",
            "-b",
            "base.vhd",
            child.to_str().unwrap(),
        ],
    );
    let initial = std::fs::read(&child).unwrap();
    let crashed = d.path().join("crashed.vhd");
    cut_differencing_child(
        &initial,
        &child,
        "vpc",
        &crashed,
        &[
            &["check", "-r", "all", "-f", "vpc"],
            &["check", "-f", "vpc"],
        ],
    );
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "parent changed");
}
