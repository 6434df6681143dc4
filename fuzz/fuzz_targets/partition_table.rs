#![no_main]
//! The input is a whole disk: MBR/EBR chain or GPT (primary and backup), scanned as Linux would
//! with 512- and 4096-byte sectors. Every partition found must lie inside the disk.
use imgfs::views::table::{scan, MemDisk, MAX_PARTITIONS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for sector in [512, 4096] {
        if let Ok(Some(t)) = scan(&MemDisk(data), sector) {
            for p in &t.partitions {
                assert!(p.len > 0 && p.start + p.len <= data.len() as u64);
                assert!((1..=MAX_PARTITIONS).contains(&p.number));
            }
        }
    }
});
