//! QED tables: L1 in memory, L2 tables through the `TableCache`, entry classification and the
//! run lookups the block map is built on.
//!
//! ```text
//!  guest offset:  | L1 index | L2 index | byte in cluster |
//!                   l1_shift   cluster_bits
//!  L1[i] -> L2 table (table_size clusters) -> L2[j] = 0 unallocated | 1 zero | data cluster
//! ```

use super::header::Header;
use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::host::HostFile;
use std::sync::atomic::{AtomicBool, Ordering};

/// What one L2 entry says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Unalloc,
    Zero,
    Data(u64),
}

/// Sizes derived from a validated header.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_size: u64,
    pub cluster_bits: u32,
    pub entries: u64,
    pub l1_shift: u32,
    pub table_bytes: u64,
}

impl Geometry {
    pub fn new(h: &Header) -> Geometry {
        let entries = h.table_entries();
        Geometry {
            cluster_size: h.cluster_size as u64,
            cluster_bits: h.cluster_bits(),
            entries,
            l1_shift: h.cluster_bits() + entries.trailing_zeros(),
            table_bytes: h.table_bytes(),
        }
    }
    pub fn l1_index(&self, off: u64) -> usize {
        (off >> self.l1_shift) as usize
    }
    pub fn l2_index(&self, off: u64) -> usize {
        ((off >> self.cluster_bits) & (self.entries - 1)) as usize
    }
    /// Bytes from `off` to the end of the guest range its L2 table maps.
    pub fn left_in_table(&self, off: u64) -> u64 {
        let span = 1u64 << self.l1_shift;
        span - (off & (span - 1))
    }
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size - 1)
    }
}

pub fn entry_at(table: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(table[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

pub fn set_entry(table: &mut [u8], i: usize, v: u64) {
    table[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn table_to_vec(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() / 8).map(|i| entry_at(bytes, i)).collect()
}

pub fn vec_to_table(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Classify a raw L2 entry. An invalid offset is an error, or (for an image that needs a check
/// and is open read-only) treated as unallocated, as the repair would do.
pub fn classify(h: &Header, raw: u64, file_size: u64, lenient: bool) -> Result<Entry> {
    match raw {
        0 => Ok(Entry::Unalloc),
        1 => Ok(Entry::Zero),
        off if h.is_cluster_offset_valid(off, file_size) => Ok(Entry::Data(off)),
        _ if lenient => Ok(Entry::Unalloc),
        off => Err(Error::corrupt(format!(
            "QED L2 entry {off:#x} is not a valid cluster offset"
        ))),
    }
}

/// Loads and stores L2 tables. A table is only written after the data clusters it may point at
/// are durable: allocation sets `needs_sync` after filling a cluster and before publishing it.
pub struct L2Io {
    pub file: HostFile,
    pub needs_sync: AtomicBool,
}

impl TableIo for L2Io {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        if self.needs_sync.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.file.sync() {
                self.needs_sync.store(true, Ordering::SeqCst);
                return Err(e);
            }
        }
        self.file.write_all_at(buf, off)
    }
}

/// A run of clusters of one kind starting at the guest offset asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: Entry,
    pub len: u64,
}

/// Scan the L2 table `table` from guest offset `off` for at most `len` bytes: a run of
/// unallocated or zero clusters, or of data clusters contiguous in the file.
pub fn scan_run(
    g: &Geometry,
    table: &[u8],
    off: u64,
    len: u64,
    mut classify: impl FnMut(u64) -> Result<Entry>,
) -> Result<Run> {
    let len = len.min(g.left_in_table(off));
    let start = g.l2_index(off);
    let first = classify(entry_at(table, start))?;
    let mut run = g.cluster_size - g.in_cluster(off);
    let mut i = start + 1;
    while run < len && i < g.entries as usize {
        let e = classify(entry_at(table, i))?;
        let same = match (first, e) {
            (Entry::Data(a), Entry::Data(b)) => b == a + (i - start) as u64 * g.cluster_size,
            (a, b) => a == b,
        };
        if !same {
            break;
        }
        run += g.cluster_size;
        i += 1;
    }
    Ok(Run {
        first,
        len: run.min(len),
    })
}

/// Where the data of an L2 table lives, or None when the L1 entry is unallocated.
pub fn l2_offset(
    h: &Header,
    l1: &[u64],
    idx: usize,
    file_size: u64,
    lenient: bool,
) -> Result<Option<u64>> {
    let raw = *l1
        .get(idx)
        .ok_or_else(|| Error::invalid(format!("guest offset beyond the L1 table (index {idx})")))?;
    if raw == 0 {
        return Ok(None);
    }
    if h.is_table_offset_valid(raw, file_size) {
        return Ok(Some(raw));
    }
    if lenient {
        return Ok(None);
    }
    Err(Error::corrupt(format!(
        "QED L1 entry {idx} points at an invalid L2 table offset {raw:#x}"
    ))
    .at(h.l1_table_offset + idx as u64 * 8))
}

/// Read a whole table outside the cache (check, open).
pub fn read_table(file: &HostFile, off: u64, bytes: u64) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; bytes as usize];
    file.read_exact_at(&mut buf, off)?;
    Ok(table_to_vec(&buf))
}

pub fn new_cache(g: &Geometry, budget: u64) -> TableCache {
    TableCache::new(g.table_bytes as usize, budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            cluster_size: 4096,
            table_size: 1,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 4096,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    #[test]
    fn geometry_and_runs() {
        let h = hdr();
        let g = Geometry::new(&h);
        assert_eq!(g.entries, 512);
        assert_eq!(g.l1_shift, 21);
        let mut t = vec![0u8; 4096];
        set_entry(&mut t, 0, 0x10000);
        set_entry(&mut t, 1, 0x11000);
        set_entry(&mut t, 2, 0x20000);
        set_entry(&mut t, 3, 1);
        set_entry(&mut t, 4, 1);
        let fs = 1 << 20;
        let c = |raw| classify(&h, raw, fs, false);
        let r = scan_run(&g, &t, 100, 1 << 20, c).unwrap();
        assert_eq!(
            r,
            Run {
                first: Entry::Data(0x10000),
                len: 8192 - 100
            }
        );
        let r = scan_run(&g, &t, 3 * 4096, 1 << 20, c).unwrap();
        assert_eq!(
            r,
            Run {
                first: Entry::Zero,
                len: 8192
            }
        );
        let r = scan_run(&g, &t, 5 * 4096 + 1, 1 << 30, c).unwrap();
        assert_eq!(
            r,
            Run {
                first: Entry::Unalloc,
                len: (2 << 20) - 5 * 4096 - 1
            }
        );
    }

    #[test]
    fn invalid_entries() {
        let h = hdr();
        for raw in [2, 0x10001, 0, 4096 * 1000, u64::MAX] {
            let strict = classify(&h, raw, 1 << 20, false);
            let lenient = classify(&h, raw, 1 << 20, true).unwrap();
            if raw == 0 {
                assert_eq!(lenient, Entry::Unalloc);
            } else {
                assert!(strict.is_err(), "{raw:#x}");
                assert_eq!(lenient, Entry::Unalloc);
            }
        }
        // Data inside the header is refused.
        assert!(classify(&h, 0, 1 << 20, false).is_ok());
        let mut h2 = h.clone();
        h2.header_size = 2;
        assert!(classify(&h2, 4096, 1 << 20, false).is_err());
        let l1 = vec![0, 4096 * 3, 12345];
        assert_eq!(l2_offset(&h, &l1, 0, 1 << 20, false).unwrap(), None);
        assert_eq!(
            l2_offset(&h, &l1, 1, 1 << 20, false).unwrap(),
            Some(4096 * 3)
        );
        assert!(l2_offset(&h, &l1, 2, 1 << 20, false).is_err());
        assert_eq!(l2_offset(&h, &l1, 2, 1 << 20, true).unwrap(), None);
        assert!(l2_offset(&h, &l1, 1, 4096 * 3, false).is_err());
        assert!(l2_offset(&h, &l1, 7, 1 << 20, true).is_err());
    }
}
