#![no_main]
use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;

// A whole sparse extent (monolithicSparse or streamOptimized): header, footer, embedded
// descriptor, grain directories and tables, compressed grains.
fuzz_target!(|data: &[u8]| common::open_and_read("vmdk", common::MemFile::dense(data)));
