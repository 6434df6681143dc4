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

/// The used block indices and the header's allocated count of a VDI's bytes.
fn indices(img: &[u8]) -> (Vec<u32>, u32) {
    let at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap());
    let (bmap, blocks, count) = (at(0x154) as usize, at(0x180) as usize, at(0x184));
    let used = (0..blocks)
        .map(|b| at(bmap + b * 4))
        .filter(|&e| e < 0xffff_fffe)
        .collect();
    (used, count)
}

/// Whether the used indices are exactly 0..count (what QEMU and VirtualBox allocate after).
fn prefix(used: &[u32]) -> bool {
    let mut v = used.to_vec();
    v.sort_unstable();
    v.iter().enumerate().all(|(i, &x)| x == i as u32)
}

/// Power cuts while many blocks are allocated between fsyncs, with a block map of eight pages
/// (1 KiB blocks, 8192 of them) and a cache of two, so map pages are also written back by
/// eviction, in least-recently-used order rather than index order: a cut can keep the page
/// holding a later allocation's entry and lose the page holding an earlier one's (or a flush
/// can be cut between two page writes), leaving an unused index below a used one. QEMU
/// and VirtualBox allocate at the header's count, so they would then overwrite a block in use.
/// After imgfs reopens the crashed image read-write the used indices must be exactly 0..count
/// with the header saying count, and every fsync'd byte must still read back (the crash
/// simulator's own check, which reopens read-write too).
#[test]
fn cut_allocations_leave_indices_qemu_can_extend() {
    use imgfs::crashsim::{run_many, Workload};
    use imgfs::host::FaultFile;
    let d = tmpdir();
    let name = d.path().join("small-blocks.vdi");
    let (size, bs) = (8u64 << 20, 1024u32);
    let blocks = (size / bs as u64) as u32;
    let ids = [[0x11; 16], [0x22; 16], [0; 16], [0; 16]];
    let mut initial = imgfs::formats::vdi::build_header(1, size, bs, blocks, 0, ids);
    initial.extend(std::iter::repeat_n(
        0xffu8,
        imgfs::formats::vdi::bmap_bytes(blocks) as usize,
    ));
    let (mut holes, mut cuts) = (0, 0);
    for cache_size in [imgfs::image::DEFAULT_CACHE_SIZE, 8192] {
        let work = Workload {
            ops: 40,
            max_write: 64 << 10,
            cache_size,
            ..Workload::default()
        };
        let seeds = cache_size..cache_size + 100;
        cuts += run_many(&initial, &name, "vdi", seeds, &work, |seed, cut| {
            holes += u32::from(!prefix(&indices(&cut.image).0));
            let fault = FaultFile::new(cut.image.clone());
            let opts = imgfs::OpenOpts {
                format: Some("vdi".into()),
                lock: false,
                ..Default::default()
            };
            imgfs::Image::open_host(fault.host_file(&name, true), &opts)
                .and_then(|img| img.close())
                .unwrap_or_else(|e| panic!("seed {seed}: reopen: {e}"));
            let (used, count) = indices(&fault.contents());
            assert!(
                prefix(&used) && used.len() == count as usize,
                "seed {seed}: after a read-write open, indices {used:?} with count {count}"
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cache {cache_size}: {e}"));
    }
    eprintln!("{cuts} cuts, {holes} left an unused index below a used one before the reopen");
    assert!(holes > 0, "no cut exercised the case");
}
