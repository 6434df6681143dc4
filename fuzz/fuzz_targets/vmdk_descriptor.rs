#![no_main]
use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;

// The text descriptor parser, then the same bytes opened as a standalone descriptor (its
// extent files are looked up beside a nonexistent path and refused), and as an OVA archive.
fuzz_target!(|data: &[u8]| {
    if let Ok(d) = imgfs::formats::vmdk::descriptor::Descriptor::parse(data) {
        let _ = d.sectors();
        let _ = d.with_cid(0x1234_5678);
    }
    common::open_and_read("vmdk", common::MemFile::dense(data));
    let f = imgfs::host::FaultFile::new(data.to_vec());
    let host = f.host_file(std::path::Path::new("/nonexistent/fuzz/app.ova"), false);
    if let Ok(disks) = imgfs::formats::vmdk::ova::disks(&host) {
        for m in disks {
            let mut b = [0u8; 512];
            let _ = imgfs::formats::vmdk::ova::member_file(&host, &m).read_at(&mut b, 0);
        }
    }
});
