//! Differencing VHD crash safety: power cuts (crash simulator) while writing into a child made
//! by `imgfs create -b` over a dynamic parent, with a two-table cache so BAT pages and sector
//! bitmaps are also written back by eviction. Every fsync'd byte must survive, the parent must
//! stay untouched, and `imgfs check` must find the crashed child clean. (Plain dynamic and fixed
//! VHDs are cut in tests/powercut.rs.)

mod common;

use common::*;
use imgfs::crashsim::{run_many, Workload};

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
    for cache_size in [imgfs::image::DEFAULT_CACHE_SIZE, 1] {
        let work = Workload {
            ops: 40,
            max_write: 64 << 10,
            cache_size,
            ..Workload::default()
        };
        let n = run_many(&initial, &child, "vpc", 0..30, &work, |seed, cut| {
            if seed % 5 == 0 {
                std::fs::write(&crashed, &cut.image).unwrap();
                let out = run(IMGFS, &["check", "-f", "vpc", crashed.to_str().unwrap()]);
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
