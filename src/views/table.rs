//! Partition tables (MBR with logical partitions, GPT), read the way Linux's block layer reads them
//! (block/partitions/{msdos,efi}.c), with every count, offset and chain bounded.
//!
//! Written here rather than taken from `mbrman`/`gptman`: those read through `Read + Seek`, reserve
//! `number_of_partition_entries` entries before reading any (a hostile count of 2^32 aborts the
//! process), do unchecked `u32` sector arithmetic, follow an EBR chain as long as it increases
//! (millions of hops on a large hostile disk), reject a whole MBR over one bad EBR where Linux keeps
//! the partitions before it, and do not number partitions as Linux does (hybrid MBRs, the 1 KiB
//! extended-partition stub, garbage in EBR slots 3 and 4). What we need is small: read, validate,
//! number; no writing.
//!
//! ```text
//!   LBA 0      MBR: 446 boot code | 4 x 16-byte entries | 55 AA
//!              (GPT disks: one type-0xEE "protective" entry starting at LBA 1)
//!   LBA 1      GPT header: "EFI PART", header CRC32, entry array LBA/count/size, array CRC32
//!   LBA 2..    GPT entry array: 128-byte entries (type GUID, GUID, first/last LBA, attrs, name)
//!   ...
//!   last LBAs  backup entry array, then the backup header in the disk's last sector
//!
//!   extended partition: EBR | logical 5 ... | EBR | logical 6 ...   (each EBR: entry 1 = the
//!   logical partition relative to this EBR, entry 2 = the next EBR relative to the extended start)
//! ```

use crate::error::Result;
use serde::Serialize;

/// Reads `buf.len()` bytes of the disk at a byte offset (zeros past the end are the caller's
/// business: the scanner never asks for bytes past `size`).
pub trait Disk {
    fn size(&self) -> u64;
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Linux's number: MBR primaries 1-4, logicals from 5 in chain order; GPT entry index + 1.
    pub number: u32,
    /// Byte offset and length on the disk (always inside it).
    pub start: u64,
    pub len: u64,
    /// MBR: the system id as two hex digits ("83"); GPT: the type GUID.
    pub type_id: String,
    /// GPT only: the partition's own GUID and its label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT attribute bits, or 0x80 for an MBR partition marked active.
    pub attributes: u64,
    /// An MBR extended partition: exposed, as Linux does, as a 1 KiB stub (room for a boot loader,
    /// too small for mkfs).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Table {
    pub scheme: Scheme,
    pub sector_size: u64,
    /// GPT disk GUID, or the MBR disk signature as 8 hex digits.
    pub disk_id: String,
    pub partitions: Vec<Partition>,
    /// What was wrong and what was done about it (backup GPT used, chain loop, truncation...).
    pub warnings: Vec<String>,
    /// Byte ranges the table lives in: a write there means the table may have changed.
    #[serde(skip)]
    pub table_ranges: Vec<(u64, u64)>,
}

/// Linux numbers at most 255 partitions per disk (DISK_MAX_PARTS - 1).
pub const MAX_PARTITIONS: u32 = 255;
/// Largest GPT entry array we read (Linux: KMALLOC_MAX_SIZE; 4 MiB = 32768 entries).
const MAX_GPT_ARRAY: u64 = 4 << 20;
/// EBR hops without finding a partition before giving up (Linux's `loopct`).
const MAX_EMPTY_EBRS: u32 = 100;
const MBR_LEN: usize = 512;

/// Find the partition table of `disk`. `sector_hint` is the disk's logical sector size (512, or
/// 4096 for 4Kn VHDX); a GPT is also looked for at the other size. Ok(None): no table.
pub fn scan(disk: &dyn Disk, sector_hint: u64) -> Result<Option<Table>> {
    let size = disk.size();
    if size < MBR_LEN as u64 {
        return Ok(None);
    }
    let mut mbr = [0u8; MBR_LEN];
    disk.read(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries = mbr_entries(&mbr);
    // Linux: efi_partition runs before msdos_partition; a disk with a protective (or hybrid) MBR
    // is a GPT disk, and msdos_partition refuses any disk that has a 0xEE entry at all.
    if entries.iter().any(|e| e.sys == 0xEE) {
        let has_pmbr = entries.iter().any(|e| e.sys == 0xEE && e.start == 1);
        if !has_pmbr {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let mut sizes = vec![sector_hint];
        sizes.extend([512, 4096].into_iter().filter(|&s| s != sector_hint));
        for ss in sizes {
            match gpt(disk, ss)? {
                Ok(t) => return Ok(Some(finish(t, size))),
                Err(e) => errors.push(format!("{ss}-byte sectors: {e}")),
            }
        }
        log::warn!(
            "protective MBR but no valid GPT ({}): no partitions",
            errors.join("; ")
        );
        return Ok(None);
    }
    // Linux: with 55 AA present this is a partition table or a FAT boot sector; boot indicators
    // other than 0 and 0x80 mean the latter.
    if entries.iter().any(|e| e.boot != 0 && e.boot != 0x80) {
        return Ok(None);
    }
    let ss = if sector_hint == 4096 { 4096 } else { 512 };
    Ok(Some(finish(msdos(disk, &mbr, &entries, ss)?, size)))
}

/// Drop partitions starting past the end, cut those running past it (Linux does the same in
/// blk_add_partition), and note overlaps.
fn finish(mut t: Table, size: u64) -> Table {
    let mut warnings = std::mem::take(&mut t.warnings);
    t.partitions.retain_mut(|p| {
        if p.start >= size {
            warnings.push(format!(
                "partition {} starts past the disk's end; ignored",
                p.number
            ));
            return false;
        }
        if p.len > size - p.start {
            warnings.push(format!(
                "partition {} runs past the disk's end; cut to {} bytes",
                p.number,
                size - p.start
            ));
            p.len = size - p.start;
        }
        p.len > 0
    });
    let mut by_start: Vec<&Partition> = t.partitions.iter().filter(|p| !p.extended).collect();
    by_start.sort_by_key(|p| p.start);
    for w in by_start.windows(2) {
        if w[0].start + w[0].len > w[1].start {
            warnings.push(format!(
                "partitions {} and {} overlap",
                w[0].number, w[1].number
            ));
        }
    }
    t.warnings = warnings;
    t
}

#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    boot: u8,
    sys: u8,
    start: u32,
    sectors: u32,
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]))
}

fn mbr_entries(sector: &[u8; MBR_LEN]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..462 + 16 * i];
        MbrEntry {
            boot: e[0],
            sys: e[4],
            start: le32(&e[8..12]),
            sectors: le32(&e[12..16]),
        }
    })
}

fn is_extended(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0F | 0x85)
}

fn msdos(disk: &dyn Disk, mbr: &[u8; MBR_LEN], entries: &[MbrEntry; 4], ss: u64) -> Result<Table> {
    let mut t = Table {
        scheme: Scheme::Mbr,
        sector_size: ss,
        disk_id: format!("{:08x}", le32(&mbr[440..444])),
        partitions: Vec::new(),
        warnings: Vec::new(),
        table_ranges: vec![(0, MBR_LEN as u64)],
    };
    let mut next = 5u32;
    for (i, e) in entries.iter().enumerate() {
        if e.sectors == 0 {
            continue;
        }
        let start = e.start as u64 * ss;
        let len = e.sectors as u64 * ss;
        let part = Partition {
            number: i as u32 + 1,
            start,
            len,
            type_id: format!("{:02x}", e.sys),
            guid: None,
            name: None,
            attributes: (e.boot == 0x80) as u64 * 0x80,
            extended: false,
        };
        if is_extended(e.sys) {
            t.partitions.push(Partition {
                len: len.min(ss.max(1024)),
                extended: true,
                ..part
            });
            logicals(disk, &mut t, start, len, ss, &mut next)?;
        } else {
            t.partitions.push(part);
        }
    }
    Ok(t)
}

/// Follow the EBR chain of an extended partition at `first` (bytes) of `first_len` bytes.
fn logicals(
    disk: &dyn Disk,
    t: &mut Table,
    first: u64,
    first_len: u64,
    ss: u64,
    next: &mut u32,
) -> Result<()> {
    let mut this = first;
    let mut this_len = first_len;
    let mut visited = std::collections::HashSet::new();
    let mut empty_hops = 0;
    loop {
        if *next > MAX_PARTITIONS {
            t.warnings.push(format!(
                "more than {MAX_PARTITIONS} partitions; the rest ignored"
            ));
            return Ok(());
        }
        if !visited.insert(this) {
            let msg = format!(
                "EBR chain loops back to byte {this}; logical partitions after {} ignored",
                *next - 1
            );
            log::error!("{msg}");
            t.warnings.push(msg);
            return Ok(());
        }
        empty_hops += 1;
        if empty_hops > MAX_EMPTY_EBRS {
            t.warnings.push(format!(
                "{MAX_EMPTY_EBRS} EBRs without a partition; chain ignored past them"
            ));
            return Ok(());
        }
        if this.saturating_add(MBR_LEN as u64) > disk.size() {
            t.warnings
                .push(format!("EBR at byte {this} lies past the disk's end"));
            return Ok(());
        }
        let mut ebr = [0u8; MBR_LEN];
        disk.read(this, &mut ebr)?;
        t.table_ranges.push((this, MBR_LEN as u64));
        if ebr[510..512] != [0x55, 0xAA] {
            return Ok(());
        }
        let entries = mbr_entries(&ebr);
        for (i, e) in entries.iter().enumerate() {
            if e.sectors == 0 || is_extended(e.sys) {
                continue;
            }
            let offs = e.start as u64 * ss;
            let size = e.sectors as u64 * ss;
            let start = this + offs;
            // Slots 3 and 4 sometimes hold garbage: keep them only inside this EBR's span and the
            // extended partition (Linux's rule).
            if i >= 2
                && (offs + size > this_len
                    || start < first
                    || start + size > first.saturating_add(first_len))
            {
                continue;
            }
            t.partitions.push(Partition {
                number: *next,
                start,
                len: size,
                type_id: format!("{:02x}", e.sys),
                guid: None,
                name: None,
                attributes: (e.boot == 0x80) as u64 * 0x80,
                extended: false,
            });
            empty_hops = 0;
            *next += 1;
            if *next > MAX_PARTITIONS {
                break;
            }
        }
        let Some(link) = entries
            .iter()
            .find(|e| e.sectors != 0 && is_extended(e.sys))
        else {
            return Ok(());
        };
        this = first + link.start as u64 * ss;
        this_len = link.sectors as u64 * ss;
    }
}

/// GPT header fields we use.
struct GptHeader {
    my_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: [u8; 16],
    entries_lba: u64,
    entries: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Ok(Err(reason)): no valid GPT at this sector size; Err: the disk could not be read.
fn gpt(disk: &dyn Disk, ss: u64) -> Result<std::result::Result<Table, String>> {
    let sectors = disk.size() / ss;
    if sectors < 3 {
        return Ok(Err("disk too small".into()));
    }
    let last_lba = sectors - 1;
    let mut warnings = Vec::new();
    let (h, entries) = match gpt_at(disk, ss, 1, last_lba)? {
        Ok(v) => v,
        Err(primary) => match gpt_at(disk, ss, last_lba, last_lba)? {
            Ok(v) => {
                let msg = format!(
                    "primary GPT invalid ({primary}); using the backup GPT at LBA {last_lba}"
                );
                log::warn!("{msg}");
                warnings.push(msg);
                v
            }
            Err(backup) => {
                return Ok(Err(format!("primary: {primary}; backup: {backup}")));
            }
        },
    };
    let mut t = Table {
        scheme: Scheme::Gpt,
        sector_size: ss,
        disk_id: guid_string(&h.disk_guid),
        partitions: Vec::new(),
        warnings,
        table_ranges: vec![
            (0, 2 * ss),
            (h.entries_lba * ss, h.entries as u64 * h.entry_size as u64),
            (last_lba * ss, ss),
        ],
    };
    for (i, e) in entries.chunks_exact(h.entry_size as usize).enumerate() {
        if i as u32 >= MAX_PARTITIONS {
            break;
        }
        let type_guid: [u8; 16] = e[0..16].try_into().unwrap_or([0; 16]);
        if type_guid == [0; 16] {
            continue;
        }
        let first = le64(&e[32..40]);
        let last = le64(&e[40..48]);
        // Linux's is_pte_valid: both ends on the disk. An inverted entry is skipped too.
        if first > last_lba || last > last_lba || first > last {
            t.warnings.push(format!(
                "GPT entry {} lies outside the disk; ignored",
                i + 1
            ));
            continue;
        }
        if first < h.first_usable || last > h.last_usable {
            t.warnings.push(format!(
                "GPT entry {} lies outside the usable LBAs {}-{}",
                i + 1,
                h.first_usable,
                h.last_usable
            ));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        t.partitions.push(Partition {
            number: i as u32 + 1,
            start: first * ss,
            len: (last - first + 1) * ss,
            type_id: guid_string(&type_guid),
            guid: Some(guid_string(e[16..32].try_into().unwrap_or(&[0; 16]))),
            name: Some(String::from_utf16_lossy(&name)),
            attributes: le64(&e[48..56]),
            extended: false,
        });
    }
    Ok(Ok(t))
}

/// Read and validate the GPT header at `lba` and its entry array (Linux's is_gpt_valid).
fn gpt_at(
    disk: &dyn Disk,
    ss: u64,
    lba: u64,
    last_lba: u64,
) -> Result<std::result::Result<(GptHeader, Vec<u8>), String>> {
    let mut sector = vec![0u8; ss as usize];
    disk.read(lba * ss, &mut sector)?;
    if &sector[0..8] != b"EFI PART" {
        return Ok(Err("no GPT signature".into()));
    }
    let header_size = le32(&sector[12..16]) as u64;
    if !(92..=ss).contains(&header_size) {
        return Ok(Err(format!("header size {header_size}")));
    }
    let stored = le32(&sector[16..20]);
    let mut hdr = sector[..header_size as usize].to_vec();
    hdr[16..20].fill(0);
    if crc32fast::hash(&hdr) != stored {
        return Ok(Err("header CRC mismatch".into()));
    }
    let h = GptHeader {
        my_lba: le64(&sector[24..32]),
        first_usable: le64(&sector[40..48]),
        last_usable: le64(&sector[48..56]),
        disk_guid: sector[56..72].try_into().unwrap_or([0; 16]),
        entries_lba: le64(&sector[72..80]),
        entries: le32(&sector[80..84]),
        entry_size: le32(&sector[84..88]),
        entries_crc: le32(&sector[88..92]),
    };
    if h.my_lba != lba {
        return Ok(Err(format!("header names LBA {} as its own", h.my_lba)));
    }
    if h.first_usable > last_lba || h.last_usable > last_lba || h.first_usable > h.last_usable {
        return Ok(Err(format!(
            "usable LBAs {}-{} outside the disk",
            h.first_usable, h.last_usable
        )));
    }
    // Linux accepts only 128-byte entries.
    if h.entry_size != 128 {
        return Ok(Err(format!("entry size {}", h.entry_size)));
    }
    let array_len = h.entries as u64 * h.entry_size as u64;
    if array_len > MAX_GPT_ARRAY {
        return Ok(Err(format!("{} entries", h.entries)));
    }
    let array_end = h
        .entries_lba
        .checked_mul(ss)
        .and_then(|o| o.checked_add(array_len));
    if h.entries_lba == 0 || array_end.is_none_or(|end| end > disk.size()) {
        return Ok(Err(format!(
            "entry array at LBA {} outside the disk",
            h.entries_lba
        )));
    }
    let mut array = vec![0u8; array_len as usize];
    disk.read(h.entries_lba * ss, &mut array)?;
    if crc32fast::hash(&array) != h.entries_crc {
        return Ok(Err("entry array CRC mismatch".into()));
    }
    Ok(Ok((h, array)))
}

/// A GUID in its usual text form, upper case as sfdisk and gdisk print it (the first three fields
/// are stored little-endian).
pub fn guid_string(g: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes_le(*g)
        .hyphenated()
        .to_string()
        .to_uppercase()
}

/// A disk held in memory (fuzzing, unit tests).
pub struct MemDisk<'a>(pub &'a [u8]);

impl Disk for MemDisk<'_> {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let start = (off.min(self.size())) as usize;
        let n = buf.len().min(self.0.len() - start);
        buf[..n].copy_from_slice(&self.0[start..start + n]);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
