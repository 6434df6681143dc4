#![no_main]
use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    common::fix_vpc_checksums(&mut data);
    common::open_and_read("vpc", common::MemFile::dense(&data))
});
