//! The format cases the stress tester runs: one line per case. A new format is one more entry.
//!
//! Each case builds its image with shell steps run by `sh -e` in a scratch directory, with these
//! variables set: `IMG` (the image to mount), `DIR` (the scratch directory), `SIZE` (virtual size in
//! bytes), `BSIZE` (a backing image's size, smaller than SIZE and not cluster-aligned, so reads and
//! writes cross the backing image's end), `DATA` (1 MiB of random bytes), `IMGFS` (the imgfs binary).

use std::path::Path;

pub struct Case {
    /// Name on the command line (`--formats qcow2-chain,...`).
    pub name: &'static str,
    /// Format of IMG (`imgfs check -f`, `qemu-img -f`).
    pub fmt: &'static str,
    /// Allocation unit (cluster, block, grain): offsets are biased toward its multiples.
    pub cluster: u64,
    /// The case has a backing image of BSIZE bytes: offsets are biased toward its end too.
    pub backing: bool,
    /// `qemu-img check` supports the format and opens the image (exit 0 required after a run).
    pub qemu_check: bool,
    /// File (relative to DIR; "$IMG" for the image itself) whose `qemu-img convert -O raw` is the
    /// initial guest content; "" = all zeros. After the run the image itself is converted when
    /// `qemu_reads`, otherwise it is read back through a fresh read-only imgfs mount.
    pub initial: &'static str,
    pub qemu_reads: bool,
    /// An internal snapshot the case makes ("" none): after the run its contents, through
    /// `qemu-img convert -l snapshot.name=...`, must be what they were before.
    pub snapshot: &'static str,
    /// Shell steps (each one `sh -e -c`).
    pub create: &'static [&'static str],
}

/// Random data written by QEMU before the run (so the model starts from non-trivial content),
/// including ranges across the image's and the backing image's allocation units.
const QEMU_FILL: &str = "qemu-io -f $FMT -c \"write -s $DATA 1048064 1048576\" -c \"write -s $DATA 7340032 65536\" -c \"write -z 9437184 131072\" -c \"write -s $DATA $((SIZE - 1048576)) 1048576\" $IMG >/dev/null";

pub const CASES: &[Case] = &[
    Case {
        name: "raw",
        fmt: "raw",
        cluster: 4096,
        backing: false,
        qemu_check: false,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &["truncate -s $SIZE $IMG", QEMU_FILL],
    },
    Case {
        name: "qcow",
        fmt: "qcow",
        cluster: 4096,
        backing: false,
        qemu_check: false,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        // Compressed clusters: convert -c from a raw file with data (qemu-img may exit 1 without a
        // message here although the output is complete: the initial model is read from the result).
        create: &[
            "truncate -s $SIZE $DIR/src.raw",
            "FMT=raw IMG=$DIR/src.raw; eval \"$QEMU_FILL\"",
            "qemu-img convert -c -f raw -O qcow $DIR/src.raw $IMG || true",
            "qemu-img compare -f qcow -F raw $IMG $DIR/src.raw >/dev/null",
            "qemu-io -f qcow -c \"write -s $DATA 20971520 200000\" $IMG >/dev/null",
        ],
    },
    Case {
        name: "qcow-chain",
        fmt: "qcow",
        cluster: 4096,
        backing: true,
        qemu_check: false,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "truncate -s $BSIZE $DIR/base.raw",
            "FMT=raw IMG=$DIR/base.raw SIZE=$BSIZE; eval \"$QEMU_FILL\"",
            "qemu-img create -q -f qcow -b base.raw -F raw $IMG $SIZE",
            "qemu-io -f qcow -c \"write -s $DATA 5000000 70000\" $IMG >/dev/null",
        ],
    },
    // qcow2 over a qcow2 backing image, with compressed clusters (own qemu-io run: see
    // docs/testing.md) and an internal snapshot sharing clusters with the active layer.
    Case {
        name: "qcow2-chain",
        fmt: "qcow2",
        cluster: 65536,
        backing: true,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "s1",
        create: &[
            "qemu-img create -q -f qcow2 $DIR/base.qcow2 $BSIZE",
            "FMT=qcow2 IMG=$DIR/base.qcow2 SIZE=$BSIZE; eval \"$QEMU_FILL\"",
            "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 $IMG $SIZE",
            "qemu-io -f qcow2 -c \"write -c -s $DATA 2097152 262144\" -c \"write -c -s $DATA 12582912 131072\" $IMG >/dev/null",
            "FMT=qcow2; eval \"$QEMU_FILL\"",
            "qemu-img snapshot -c s1 $IMG",
            "qemu-io -f qcow2 -c \"write -s $DATA 1179648 65536\" $IMG >/dev/null",
        ],
    },
    // Small clusters with subclusters (extended L2) and lazy refcounts.
    Case {
        name: "qcow2-extl2",
        fmt: "qcow2",
        cluster: 32768,
        backing: false,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f qcow2 -o cluster_size=32k,extended_l2=on,lazy_refcounts=on $IMG $SIZE",
            "FMT=qcow2; eval \"$QEMU_FILL\"",
            "qemu-io -f qcow2 -c \"write -c -s $DATA 4194304 65536\" $IMG >/dev/null",
        ],
    },
    Case {
        name: "qed-chain",
        fmt: "qed",
        cluster: 65536,
        backing: true,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "truncate -s $BSIZE $DIR/base.raw",
            "FMT=raw IMG=$DIR/base.raw SIZE=$BSIZE; eval \"$QEMU_FILL\"",
            "qemu-img create -q -f qed -b base.raw -F raw $IMG $SIZE",
            "qemu-io -f qed -c \"write -s $DATA 3000000 100000\" $IMG >/dev/null",
        ],
    },
    Case {
        name: "qed",
        fmt: "qed",
        cluster: 4096,
        backing: false,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f qed -o cluster_size=4096 $IMG $SIZE",
            "FMT=qed; eval \"$QEMU_FILL\"",
        ],
    },
    Case {
        name: "vhdx",
        fmt: "vhdx",
        cluster: 1 << 20,
        backing: false,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f vhdx -o block_size=1M $IMG $SIZE",
            "FMT=vhdx; eval \"$QEMU_FILL\"",
        ],
    },
    // QEMU cannot open 4096-byte-sector VHDX: imgfs makes it, the model starts from zeros.
    Case {
        name: "vhdx-4k",
        fmt: "vhdx",
        cluster: 1 << 20,
        backing: false,
        qemu_check: false,
        initial: "",
        qemu_reads: false,
        snapshot: "",
        create: &["$IMGFS create -f vhdx -o logical_sector_size=4096,block_size=1M $IMG $SIZE >/dev/null"],
    },
    // A differencing VHDX (sector bitmaps) over a QEMU-made parent with data; QEMU does not open
    // differencing VHDX, so the initial content is the parent's.
    Case {
        name: "vhdx-diff",
        fmt: "vhdx",
        cluster: 1 << 20,
        backing: true,
        qemu_check: false,
        initial: "parent.vhdx",
        qemu_reads: false,
        snapshot: "",
        create: &[
            "qemu-img create -q -f vhdx -o block_size=1M $DIR/parent.vhdx $SIZE",
            "FMT=vhdx IMG=$DIR/parent.vhdx; eval \"$QEMU_FILL\"",
            "$IMGFS create -f vhdx -b parent.vhdx $IMG >/dev/null",
        ],
    },
    Case {
        name: "vmdk",
        fmt: "vmdk",
        cluster: 64 << 10,
        backing: false,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f vmdk $IMG $SIZE",
            "FMT=vmdk; eval \"$QEMU_FILL\"",
        ],
    },
    // force_size: the disk is SIZE bytes, not SIZE rounded to a CHS geometry.
    Case {
        name: "vpc",
        fmt: "vpc",
        cluster: 2 << 20,
        backing: false,
        qemu_check: false,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f vpc -o force_size=on $IMG $SIZE",
            "FMT=vpc; eval \"$QEMU_FILL\"",
        ],
    },
    Case {
        name: "vdi",
        fmt: "vdi",
        cluster: 1 << 20,
        backing: false,
        qemu_check: true,
        initial: "$IMG",
        qemu_reads: true,
        snapshot: "",
        create: &[
            "qemu-img create -q -f vdi $IMG $SIZE",
            "FMT=vdi; eval \"$QEMU_FILL\"",
        ],
    },
];

pub fn find(name: &str) -> Option<&'static Case> {
    CASES.iter().find(|c| c.name == name)
}

/// Build the case's image in `dir`; returns the image path.
pub fn build(
    case: &Case,
    dir: &Path,
    size: u64,
    bsize: u64,
    imgfs: &Path,
    seed: u64,
) -> Result<std::path::PathBuf, String> {
    let img = dir.join(format!("disk.{}", case.fmt));
    let data = dir.join("data");
    let mut rng = imgfs::host::SplitMix64::new(seed ^ 0xda7a);
    let mut bytes = vec![0u8; 1 << 20];
    rng.fill(&mut bytes);
    std::fs::write(&data, &bytes).map_err(|e| format!("{}: {e}", data.display()))?;
    for step in case.create {
        let out = std::process::Command::new("sh")
            .args(["-e", "-c", step])
            .current_dir(dir)
            .env("IMG", &img)
            .env("DIR", dir)
            .env("SIZE", size.to_string())
            .env("BSIZE", bsize.to_string())
            .env("DATA", &data)
            .env("FMT", case.fmt)
            .env("IMGFS", imgfs)
            .env("QEMU_FILL", QEMU_FILL)
            .output()
            .map_err(|e| format!("sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{}: step `{step}` failed: {}{}",
                case.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(img)
}
