#![no_main]
use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;

// A whole sparse extent (monolithicSparse or streamOptimized): header, footer, embedded
// descriptor, grain directories and tables, compressed grains. An ESX delta extent (COWD or
// seSparse magic) cannot be opened by itself: it is opened through a descriptor naming it, with
// the size its header claims (clamped), so the vmfsSparse and seSparse parsers are fuzzed too.
fuzz_target!(|data: &[u8]| {
    let le = |at: usize, n: usize| {
        data.get(at..at + n)
            .map_or(0, |b| b.iter().rev().fold(0u64, |v, &x| v << 8 | x as u64))
    };
    let (kind, create, sectors) = if data.starts_with(b"COWD") {
        ("VMFSSPARSE", "vmfsSparse", le(12, 4))
    } else if le(0, 8) == 0xcafe_babe {
        ("SESPARSE", "seSparse", le(16, 8))
    } else {
        return common::open_and_read("vmdk", common::MemFile::dense(data));
    };
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"{create}\"\nRW {} {kind} \"e.vmdk\"\n",
        sectors.clamp(1, 1 << 37)
    );
    common::open_descriptor_with_extent(desc.as_bytes(), "e.vmdk", common::MemFile::dense(data));
});
