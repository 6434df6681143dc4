use super::*;

const SS: u64 = 512;

fn mbr_entry(d: &mut [u8], at: usize, slot: usize, sys: u8, start: u32, sectors: u32) {
    let e = at + 446 + 16 * slot;
    d[e + 4] = sys;
    d[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
    d[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    d[at + 510] = 0x55;
    d[at + 511] = 0xAA;
}

/// 8 MiB disk: primary 1 at 1 MiB (2 MiB), extended 2 from 3 MiB to the end with logicals at
/// 3 MiB + 1 sector (1 MiB) and 5 MiB + 1 sector (1 MiB).
fn mbr_disk() -> Vec<u8> {
    let mut d = vec![0u8; 8 << 20];
    mbr_entry(&mut d, 0, 0, 0x83, 2048, 4096);
    mbr_entry(&mut d, 0, 1, 0x05, 6144, 10240);
    let ebr1 = 6144 * 512;
    mbr_entry(&mut d, ebr1, 0, 0x83, 1, 2048);
    mbr_entry(&mut d, ebr1, 1, 0x05, 4096, 4096);
    let ebr2 = (6144 + 4096) * 512;
    mbr_entry(&mut d, ebr2, 0, 0x82, 1, 2048);
    d
}

fn numbers(t: &Table) -> Vec<(u32, u64, u64)> {
    t.partitions
        .iter()
        .map(|p| (p.number, p.start, p.len))
        .collect()
}

#[test]
fn mbr_primaries_extended_stub_and_logicals() {
    let d = mbr_disk();
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(t.scheme, Scheme::Mbr);
    assert_eq!(
        numbers(&t),
        vec![
            (1, 1 << 20, 2 << 20),
            (2, 3 << 20, 1024),
            (5, (3 << 20) + 512, 1 << 20),
            (6, (5 << 20) + 512, 1 << 20),
        ]
    );
    assert!(t.partitions[1].extended);
    assert_eq!(t.partitions[3].type_id, "82");
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

#[test]
fn ebr_loop_is_an_error_not_a_hang() {
    let mut d = mbr_disk();
    // The second EBR links back to the first.
    mbr_entry(&mut d, (6144 + 4096) * 512, 1, 0x05, 0, 4096);
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(t.partitions.len(), 4);
    assert!(
        t.warnings.iter().any(|w| w.contains("loops")),
        "{:?}",
        t.warnings
    );
}

#[test]
fn entries_past_the_end_are_dropped_or_cut() {
    let mut d = vec![0u8; 4 << 20];
    mbr_entry(&mut d, 0, 0, 0x83, 2048, u32::MAX);
    mbr_entry(&mut d, 0, 1, 0x83, u32::MAX - 1, 10);
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(numbers(&t), vec![(1, 1 << 20, 3 << 20)]);
    assert_eq!(t.warnings.len(), 2);
}

#[test]
fn fat_boot_sector_is_not_a_table() {
    let mut d = vec![0u8; 1 << 20];
    mbr_entry(&mut d, 0, 0, 0x83, 2048, 100);
    d[446] = 0x12;
    assert!(scan(&MemDisk(&d), 512).unwrap().is_none());
    assert!(scan(&MemDisk(&[0u8; 4096]), 512).unwrap().is_none());
}

fn put_gpt(d: &mut [u8], entries_lba: u64, my_lba: u64, alt_lba: u64, parts: &[(u64, u64, &str)]) {
    let mut array = vec![0u8; 128 * 128];
    for (i, (first, last, name)) in parts.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&[
            0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47,
            0x7D, 0xE4,
        ]);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (j, c) in name.encode_utf16().enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&c.to_le_bytes());
        }
    }
    let last_lba = d.len() as u64 / SS - 1;
    let mut h = vec![0u8; 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&[0, 0, 1, 0]);
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(last_lba - 33).to_le_bytes());
    h[56..72].copy_from_slice(&[7; 16]);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32fast::hash(&array).to_le_bytes());
    let crc = crc32fast::hash(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let a = (entries_lba * SS) as usize;
    d[a..a + array.len()].copy_from_slice(&array);
    let o = (my_lba * SS) as usize;
    d[o..o + 92].copy_from_slice(&h);
}

fn gpt_disk() -> Vec<u8> {
    let mut d = vec![0u8; 8 << 20];
    mbr_entry(&mut d, 0, 0, 0xEE, 1, u32::MAX);
    let last = d.len() as u64 / SS - 1;
    let parts = [(2048, 4095, "boot"), (4096, 10239, "root")];
    put_gpt(&mut d, 2, 1, last, &parts);
    put_gpt(&mut d, last - 32, last, 1, &parts);
    d
}

#[test]
fn gpt_names_types_and_numbers() {
    let d = gpt_disk();
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(t.scheme, Scheme::Gpt);
    assert_eq!(
        numbers(&t),
        vec![(1, 1 << 20, 1 << 20), (2, 2 << 20, 3 << 20)]
    );
    assert_eq!(t.partitions[1].name.as_deref(), Some("root"));
    assert_eq!(
        t.partitions[0].type_id,
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    );
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
}

#[test]
fn corrupt_primary_gpt_falls_back_to_the_backup() {
    let mut d = gpt_disk();
    d[2 * 512 + 56] ^= 1; // a byte of entry 1's name: the array CRC fails
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(t.partitions[0].name.as_deref(), Some("boot"));
    assert!(t.warnings[0].contains("backup"), "{:?}", t.warnings);
    // Both bad: a GPT disk without a valid GPT has no partitions (and is not read as MBR).
    let last = d.len() - 512;
    d[last] ^= 1;
    assert!(scan(&MemDisk(&d), 512).unwrap().is_none());
}

#[test]
fn hybrid_mbr_uses_the_gpt() {
    let mut d = gpt_disk();
    mbr_entry(&mut d, 0, 1, 0x83, 2048, 2048);
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert_eq!(t.scheme, Scheme::Gpt);
    assert_eq!(t.partitions.len(), 2);
}

#[test]
fn absurd_gpt_counts_are_refused() {
    let mut d = gpt_disk();
    // Entry count 2^32-1 with a recomputed header CRC.
    d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
    d[512 + 16..512 + 20].fill(0);
    let crc = crc32fast::hash(&d[512..512 + 92]);
    d[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
    let t = scan(&MemDisk(&d), 512).unwrap().unwrap();
    assert!(t.warnings[0].contains("entries"), "{:?}", t.warnings);
}
