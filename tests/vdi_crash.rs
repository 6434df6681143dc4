//! Differencing VDI crash safety: power cuts (crash simulator) while writing into a VirtualBox
//! differencing child (copy-on-write fills from the parent), with a two-table cache so block
//! map pages are also written back by eviction. Every fsync'd byte must survive and the parent
//! stay untouched. (Dynamic and static VDIs are cut in tests/powercut.rs.)

mod common;

use common::*;

#[test]
fn crash_differencing_child() {
    let d = tmpdir();
    let base = d.path().join("base.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", base.to_str().unwrap(), "6M"]);
    let data = write_file(d.path(), "seed.bin", &random_bytes(4, 5 << 20));
    qemu_io(
        "vdi",
        &base,
        &[&format!("write -s {} 0 5M", data.display())],
    );
    let base_bytes = std::fs::read(&base).unwrap();
    let child = d.path().join("child.vdi");
    vdi_differencing_child(&base, &child);
    let initial = std::fs::read(&child).unwrap();
    let crashed = d.path().join("crashed.vdi");
    cut_differencing_child(
        &initial,
        &child,
        "vdi",
        &crashed,
        &[&["check", "-r", "all"], &["check"]],
    );
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "parent changed");
}
