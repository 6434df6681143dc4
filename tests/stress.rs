//! Short imgfs-stress runs (the model-checked random I/O tester, src/bin/imgfs-stress) on every
//! format case, each with one kill -9 round, and the ext4 file-tree run on each format. Long runs:
//! scripts/stress.sh (numbers in docs/reliability.md).

mod common;
use common::Spawn;

const STRESS: &str = env!("CARGO_BIN_EXE_imgfs-stress");

fn stress(extra: &[&str]) {
    let out = std::process::Command::new(STRESS)
        .args(["--imgfs", common::IMGFS])
        .args(extra)
        .run_output()
        .expect("run imgfs-stress");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "imgfs-stress {extra:?}: {}:\n{text}",
        out.status
    );
    assert!(text.contains(": OK in "), "imgfs-stress {extra:?}:\n{text}");
    eprint!("{text}");
}

macro_rules! model_runs {
    ($($test:ident: $case:literal, $seed:literal;)*) => {$(
        #[test]
        fn $test() {
            stress(&["--formats", $case, "--ops", "2500", "--crash", "1", "--seed", $seed]);
        }
    )*};
}

model_runs! {
    stress_raw: "raw", "0x5101";
    stress_qcow: "qcow", "0x5102";
    stress_qcow_chain: "qcow-chain", "0x5103";
    stress_qcow2_chain: "qcow2-chain", "0x5104";
    stress_qcow2_extl2: "qcow2-extl2", "0x5105";
    stress_qed: "qed", "0x5106";
    stress_qed_chain: "qed-chain", "0x5107";
    stress_vhdx: "vhdx", "0x5108";
    stress_vhdx_4k: "vhdx-4k", "0x5109";
    stress_vhdx_diff: "vhdx-diff", "0x510a";
    stress_vmdk: "vmdk", "0x510b";
    stress_vpc: "vpc", "0x510c";
    stress_vdi: "vdi", "0x510d";
}

/// ext4 inside the exposed file of each format: several processes, fstrim, e2fsck -fn, checks.
#[test]
fn stress_ext4_per_format() {
    stress(&[
        "--fs",
        "--formats",
        "raw,qcow,qcow2-chain,qed-chain,vhdx",
        "--ops",
        "400",
        "--seed",
        "0x5200",
    ]);
}

/// Every case in the tester's table has a model test above (a new format is one line in each).
#[test]
fn every_case_is_tested() {
    let out = common::ok(STRESS, &["--list"]);
    let src = include_str!("stress.rs");
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap();
        assert!(
            src.contains(&format!(": \"{name}\",")),
            "format case {name} has no test in tests/stress.rs"
        );
    }
}
