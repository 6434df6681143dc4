//! Differencing VDI crash safety: power cuts (crash simulator) while writing into a VirtualBox
//! differencing child (copy-on-write fills from the parent), with a two-table cache so block
//! map pages are also written back by eviction. Every fsync'd byte must survive and the parent
//! stay untouched. (Dynamic and static VDIs are cut in tests/powercut.rs.)

mod common;

use common::*;
use imgfs::crashsim::{run_many, Workload};

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
    for cache_size in [imgfs::image::DEFAULT_CACHE_SIZE, 1] {
        let work = Workload {
            ops: 40,
            max_write: 64 << 10,
            cache_size,
            ..Workload::default()
        };
        let n = run_many(&initial, &child, "vdi", 0..30, &work, |seed, cut| {
            if seed % 5 == 0 {
                std::fs::write(&crashed, &cut.image).unwrap();
                let out = run(IMGFS, &["check", "-r", "all", crashed.to_str().unwrap()]);
                assert!(
                    out.status.success(),
                    "seed {seed}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
                let out = run(IMGFS, &["check", crashed.to_str().unwrap()]);
                assert!(
                    out.status.success(),
                    "seed {seed}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cache {cache_size}: {e}"));
        assert_eq!(n, 30);
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "parent changed");
}
