#![no_main]
use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mut data = common::expand_sparse(data);
    common::fix_vhdx_checksums(&mut data);
    common::open_and_read("vhdx", &data)
});
