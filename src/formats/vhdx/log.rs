//! The VHDX metadata log: a circular buffer of 4 KiB sectors holding entries that describe
//! metadata sector updates. Replay at open; write-ahead entries for BAT/bitmap updates.
//!
//! ```text
//!   entry = [ hdr, desc, desc ... ][ desc ... ][ data ][ data ] ...   (4 KiB sectors, may wrap)
//!   hdr (64): "loge" checksum entry_length tail sequence(u64) descriptor_count reserved
//!             log_guid(16) flushed_file_offset(u64) last_file_offset(u64)
//!   desc (32): "desc" trailing(4) leading(8) file_offset(u64) sequence(u64)
//!              "zero" reserved(4) zero_length(u64) file_offset(u64) sequence(u64)
//!   data (4096): "data" sequence_high(u32) bytes 8..4092 of the sector sequence_low(u32)
//!   checksum: CRC-32C over the whole entry with the checksum field zeroed
//! ```
//!
//! Active sequence: the valid entry with the highest sequence number is the head; walking back
//! through contiguous entries with consecutive sequence numbers reaches the entry the head's
//! `tail` names. Entries from that one to the head are replayed in order. When the tail is not
//! found on that chain (QEMU's entries carry a stale tail), the whole chain is replayed.

use super::header::{crc_with_zeroed, Guid, Header, MIB};
use crate::error::{Error, Result};
use crate::formats::{le32, le64};
use std::collections::HashMap;

pub const SECTOR: u64 = 4096;
const S: usize = SECTOR as usize;
/// Larger logs are refused (the whole log is read into memory for replay).
pub const MAX_LOG: u64 = 256 * MIB;
/// Highest file offset a descriptor may name.
const MAX_TARGET: u64 = 1 << 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    Data { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
}

impl LogOp {
    /// Patch `buf` (which holds file bytes at `at`) with this op where they overlap.
    pub fn patch(&self, buf: &mut [u8], at: u64) {
        let (off, len) = match self {
            LogOp::Data { off, data } => (*off, data.len() as u64),
            LogOp::Zero { off, len } => (*off, *len),
        };
        let end = at + buf.len() as u64;
        let (s, e) = (off.max(at), (off + len).min(end));
        if s >= e {
            return;
        }
        let dst = &mut buf[(s - at) as usize..(e - at) as usize];
        match self {
            LogOp::Data { data, .. } => {
                dst.copy_from_slice(&data[(s - off) as usize..(e - off) as usize])
            }
            LogOp::Zero { .. } => dst.fill(0),
        }
    }
}

/// What replaying the active sequence does.
#[derive(Debug, Default)]
pub struct Replay {
    pub ops: Vec<LogOp>,
    pub entries: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    #[allow(dead_code)]
    pub head_sequence: u64,
}

#[derive(Debug, Clone, Copy)]
struct EntryInfo {
    pos: u64,
    len: u64,
    tail: u64,
    seq: u64,
}

fn ring_sector(log: &[u8], pos: u64) -> &[u8] {
    let p = (pos % log.len() as u64) as usize;
    &log[p..p + S]
}

/// Check one entry at `pos`; with `ops`, also decode its descriptors.
fn parse_entry(
    log: &[u8],
    pos: u64,
    guid: &Guid,
    ops: Option<&mut Vec<LogOp>>,
) -> Option<(EntryInfo, u64, u64)> {
    let l = log.len() as u64;
    let h = ring_sector(log, pos);
    if &h[0..4] != b"loge" {
        return None;
    }
    let len = le32(h, 8) as u64;
    let tail = le32(h, 12) as u64;
    let seq = le64(h, 16);
    let ndesc = le32(h, 24) as u64;
    if len == 0
        || !len.is_multiple_of(SECTOR)
        || len > l
        || seq == 0
        || !tail.is_multiple_of(SECTOR)
        || tail >= l
    {
        return None;
    }
    if Guid::read(h, 32) != *guid {
        return None;
    }
    let total = len / SECTOR;
    let desc_sectors = (ndesc + 2).div_ceil(128);
    if desc_sectors > total {
        return None;
    }
    let mut bytes = Vec::with_capacity(len as usize);
    for i in 0..total {
        bytes.extend_from_slice(ring_sector(log, pos + i * SECTOR));
    }
    if le32(&bytes, 4) != crc_with_zeroed(&bytes, 4) {
        return None;
    }
    // Descriptors may only touch the file as long as the entry says it is.
    let limit = le64(h, 56).min(MAX_TARGET).div_ceil(MIB) * MIB;
    let mut next_data = desc_sectors;
    let mut out = Vec::new();
    for i in 0..ndesc as usize {
        let d = &bytes[64 + 32 * i..96 + 32 * i];
        let off = le64(d, 16);
        if le64(d, 24) != seq || !off.is_multiple_of(SECTOR) || off < MIB {
            return None;
        }
        match &d[0..4] {
            b"zero" => {
                let zl = le64(d, 8);
                if !zl.is_multiple_of(SECTOR) || off.checked_add(zl).is_none_or(|e| e > limit) {
                    return None;
                }
                out.push(LogOp::Zero { off, len: zl });
            }
            b"desc" => {
                if next_data >= total || off.checked_add(SECTOR).is_none_or(|e| e > limit) {
                    return None;
                }
                let ds = &bytes[(next_data * SECTOR) as usize..((next_data + 1) * SECTOR) as usize];
                next_data += 1;
                let dseq = (le32(ds, 4) as u64) << 32 | le32(ds, S - 4) as u64;
                if &ds[0..4] != b"data" || dseq != seq {
                    return None;
                }
                let mut data = Vec::with_capacity(S);
                data.extend_from_slice(&d[8..16]);
                data.extend_from_slice(&ds[8..S - 4]);
                data.extend_from_slice(&d[4..8]);
                out.push(LogOp::Data { off, data });
            }
            _ => return None,
        }
    }
    if let Some(ops) = ops {
        ops.extend(out);
    }
    let info = EntryInfo {
        pos,
        len,
        tail,
        seq,
    };
    Some((info, le64(h, 48), le64(h, 56)))
}

/// Find and decode the active sequence of a log (`log` = the whole log region).
pub fn find_active(log: &[u8], guid: &Guid) -> Option<Replay> {
    let l = log.len() as u64;
    if l == 0 || !l.is_multiple_of(SECTOR) {
        return None;
    }
    let mut valid: HashMap<u64, EntryInfo> = HashMap::new();
    for pos in (0..l).step_by(S) {
        if let Some((e, _, _)) = parse_entry(log, pos, guid, None) {
            valid.insert(pos, e);
        }
    }
    let head = *valid
        .values()
        .max_by_key(|e| (e.seq, std::cmp::Reverse(e.pos)))?;
    // Walk back from the head to the entry its tail names.
    let mut chain = vec![head];
    let mut cur = head;
    let mut covered = head.len;
    while cur.pos != head.tail {
        let prev = valid.values().find(|p| {
            p.seq + 1 == cur.seq && (p.pos + p.len) % l == cur.pos && covered + p.len <= l
        });
        match prev {
            Some(p) => {
                covered += p.len;
                chain.push(*p);
                cur = *p;
            }
            None => break,
        }
    }
    chain.reverse();
    let mut r = Replay {
        head_sequence: head.seq,
        ..Replay::default()
    };
    for e in &chain {
        let (_, flushed, last) = parse_entry(log, e.pos, guid, Some(&mut r.ops))?;
        r.entries += 1;
        r.flushed_file_offset = r.flushed_file_offset.max(flushed);
        r.last_file_offset = r.last_file_offset.max(last);
    }
    Some(r)
}

/// Read the log of header `h` (through `read`) and find its active sequence.
pub fn scan(read: &dyn Fn(&mut [u8], u64) -> Result<()>, h: &Header) -> Result<Option<Replay>> {
    if h.log_guid.is_zero() || h.log_length == 0 {
        return Ok(None);
    }
    let len = h.log_length as u64;
    if len > MAX_LOG {
        return Err(Error::unsupported(format!(
            "VHDX log of {len:#x} bytes is larger than supported ({MAX_LOG:#x})"
        ))
        .at(h.log_offset));
    }
    let mut log = vec![0u8; len as usize];
    read(&mut log, h.log_offset)?;
    Ok(find_active(&log, &h.log_guid))
}

/// Most 4 KiB pages one entry can carry in a log of `log_len` bytes (leaving one sector free).
pub fn max_pages(log_len: u64) -> usize {
    let sectors = log_len / SECTOR;
    let mut n = sectors.saturating_sub(2);
    while n > 0 && n + (n + 2).div_ceil(128) > sectors - 1 {
        n -= 1;
    }
    n as usize
}

/// Fields of one entry to write.
pub struct NewEntry<'a> {
    pub guid: Guid,
    pub sequence: u64,
    pub tail: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    /// (file offset, 4 KiB contents); all-zero pages become zero descriptors.
    pub pages: &'a [(u64, &'a [u8])],
}

/// Build the bytes of one log entry.
pub fn build_entry(e: &NewEntry) -> Vec<u8> {
    let n = e.pages.len() as u64;
    let desc_sectors = (n + 2).div_ceil(128);
    let data: Vec<&(u64, &[u8])> = e
        .pages
        .iter()
        .filter(|p| p.1.iter().any(|&b| b != 0))
        .collect();
    let total = desc_sectors + data.len() as u64;
    let mut b = vec![0u8; (total * SECTOR) as usize];
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&((total * SECTOR) as u32).to_le_bytes());
    b[12..16].copy_from_slice(&(e.tail as u32).to_le_bytes());
    b[16..24].copy_from_slice(&e.sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    b[32..48].copy_from_slice(&e.guid.0);
    b[48..56].copy_from_slice(&e.flushed_file_offset.to_le_bytes());
    b[56..64].copy_from_slice(&e.last_file_offset.to_le_bytes());
    let mut di = desc_sectors as usize;
    for (i, (off, page)) in e.pages.iter().enumerate() {
        let d = 64 + 32 * i;
        let zero = crate::format::is_zero(page);
        if zero {
            b[d..d + 4].copy_from_slice(b"zero");
            b[d + 8..d + 16].copy_from_slice(&SECTOR.to_le_bytes());
        } else {
            b[d..d + 4].copy_from_slice(b"desc");
            b[d + 4..d + 8].copy_from_slice(&page[S - 4..]);
            b[d + 8..d + 16].copy_from_slice(&page[..8]);
            let s = di * S;
            b[s..s + 4].copy_from_slice(b"data");
            b[s + 4..s + 8].copy_from_slice(&((e.sequence >> 32) as u32).to_le_bytes());
            b[s + 8..s + S - 4].copy_from_slice(&page[8..S - 4]);
            b[s + S - 4..s + S].copy_from_slice(&(e.sequence as u32).to_le_bytes());
            di += 1;
        }
        b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        b[d + 24..d + 32].copy_from_slice(&e.sequence.to_le_bytes());
    }
    let c = crc_with_zeroed(&b, 4);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Vec<u8> {
        let mut p = vec![v; S];
        p[0] = 1;
        p
    }

    fn put(log: &mut [u8], pos: u64, bytes: &[u8]) {
        let l = log.len() as u64;
        for (i, s) in bytes.chunks(S).enumerate() {
            let p = ((pos + i as u64 * SECTOR) % l) as usize;
            log[p..p + S].copy_from_slice(s);
        }
    }

    fn entry(seq: u64, tail: u64, pages: &[(u64, &[u8])]) -> Vec<u8> {
        build_entry(&NewEntry {
            guid: Guid([5; 16]),
            sequence: seq,
            tail,
            flushed_file_offset: 4 * MIB,
            last_file_offset: 5 * MIB,
            pages,
        })
    }

    #[test]
    fn round_trip_and_active_sequence() {
        let a = page(0xaa);
        let z = vec![0u8; S];
        let mut log = vec![0u8; 64 * S];
        let e1 = entry(7, 0, &[(2 * MIB, &a), (2 * MIB + SECTOR, &z)]);
        put(&mut log, 0, &e1);
        let r = find_active(&log, &Guid([5; 16])).unwrap();
        assert_eq!(r.entries, 1);
        assert_eq!(
            r.ops,
            vec![
                LogOp::Data {
                    off: 2 * MIB,
                    data: a.clone()
                },
                LogOp::Zero {
                    off: 2 * MIB + SECTOR,
                    len: SECTOR
                }
            ]
        );
        assert_eq!(r.last_file_offset, 5 * MIB);
        // A second entry whose tail still names the first: both replayed, in order.
        let b = page(0xbb);
        let p2 = e1.len() as u64;
        put(&mut log, p2, &entry(8, 0, &[(2 * MIB, &b)]));
        let r = find_active(&log, &Guid([5; 16])).unwrap();
        assert_eq!((r.entries, r.head_sequence), (2, 8));
        // Tail moved to the head itself: only the head.
        put(&mut log, p2, &entry(8, p2, &[(2 * MIB, &b)]));
        assert_eq!(find_active(&log, &Guid([5; 16])).unwrap().entries, 1);
        // Wrong GUID: nothing.
        assert!(find_active(&log, &Guid([6; 16])).is_none());
    }

    #[test]
    fn wrapped_entry_and_torn_head() {
        let a = page(0x11);
        let mut log = vec![0u8; 8 * S];
        let e = entry(3, 6 * SECTOR, &[(2 * MIB, &a), (3 * MIB, &a)]);
        assert_eq!(e.len(), 3 * S);
        put(&mut log, 6 * SECTOR, &e); // sectors 6, 7, 0
        let r = find_active(&log, &Guid([5; 16])).unwrap();
        assert_eq!(r.ops.len(), 2);
        // A torn newer entry is ignored; the older one stays the head.
        let mut e2 = entry(4, SECTOR, &[(2 * MIB, &page(0x22))]);
        e2[S + 100] ^= 0xff;
        put(&mut log, SECTOR, &e2);
        assert_eq!(find_active(&log, &Guid([5; 16])).unwrap().head_sequence, 3);
    }

    #[test]
    fn hostile_entries_are_invalid() {
        let a = page(0x33);
        let good = entry(1, 0, &[(2 * MIB, &a)]);
        let mut log = vec![0u8; 4 * S];
        for (at, val) in [(8usize, u32::MAX), (8, 100), (24, 1000), (24, u32::MAX)] {
            let mut e = good.clone();
            e[at..at + 4].copy_from_slice(&val.to_le_bytes());
            let c = crc_with_zeroed(&e, 4);
            e[4..8].copy_from_slice(&c.to_le_bytes());
            put(&mut log, 0, &e);
            assert!(find_active(&log, &Guid([5; 16])).is_none(), "{at} {val}");
        }
        // Descriptor aimed into the header section, or past the file the entry describes.
        for target in [4096, 6 * MIB, u64::MAX - 4095] {
            put(&mut log, 0, &entry(1, 0, &[(target, &a)]));
            assert!(find_active(&log, &Guid([5; 16])).is_none(), "{target:#x}");
        }
    }

    #[test]
    fn max_pages_fits() {
        let n = max_pages(MIB);
        assert!(n as u64 + (n as u64 + 2).div_ceil(128) < 256);
        assert!(n > 200);
    }
}
