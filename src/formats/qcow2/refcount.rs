//! Refcounts: the refcount table (held in memory) and refcount blocks (through a TableCache),
//! allocation at the end of the file, and deferred frees.
//!
//! ```text
//!   cluster index c -> table[c / entries_per_block] = block offset
//!                   -> block entry c % entries_per_block, refcount_bits wide
//!                      (>= 8 bits: big-endian; < 8 bits: packed, bit 0 = least significant)
//! ```
//!
//! Ordering rules kept here:
//! - increments reach disk (`flush_durable`: blocks, sync, table, sync, header, sync) before any
//!   table that references the cluster is written (the L2 cache's store calls it first);
//! - decrements are deferred (`defer_free`) and applied only after the tables that dropped the
//!   reference are durable, so a crash can leak a cluster but never free a referenced one.

use super::header::{MAX_REFTABLE_BYTES, OFF_REFCOUNT_TABLE};
use crate::cache::{TableCache, TableIo};
use crate::error::{Error, Result};
use crate::formats::be64;
use crate::host::HostFile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const RT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

struct BlockIo<'a> {
    file: &'a HostFile,
}

impl TableIo for BlockIo<'_> {
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
        self.file.write_all_at(buf, off)
    }
}

pub struct Refcounts {
    file: HostFile,
    cluster_bits: u32,
    order: u32,
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    table_dirty: bool,
    table_moved: bool,
    blocks: TableCache,
    /// First cluster index that allocation may hand out (past the end of the file at open).
    pub next_free: u64,
    /// `next_free` in bytes, for lock-free readers (`BlockMap::data_end`).
    pub frontier: Arc<AtomicU64>,
    /// Decrements waiting for the tables that dropped the reference to become durable.
    pending_free: Vec<(u64, u64)>,
    pub allocated: u64,
}

/// Read entry `i` of a refcount block with entries `1 << order` bits wide.
pub fn block_get(b: &[u8], i: usize, order: u32) -> u64 {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        b[i * n..i * n + n]
            .iter()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    } else {
        let bit = i * bits;
        let mask = (1u8 << bits) - 1;
        u64::from((b[bit / 8] >> (bit % 8)) & mask)
    }
}

pub fn block_set(b: &mut [u8], i: usize, order: u32, v: u64) {
    let bits = 1usize << order;
    if bits >= 8 {
        let n = bits / 8;
        let be = v.to_be_bytes();
        b[i * n..i * n + n].copy_from_slice(&be[8 - n..]);
    } else {
        let bit = i * bits;
        let mask = ((1u16 << bits) - 1) as u8;
        let shift = bit % 8;
        b[bit / 8] = (b[bit / 8] & !(mask << shift)) | (((v as u8) & mask) << shift);
    }
}

impl Refcounts {
    /// Load the refcount table (header already validated its position and size).
    pub fn load(
        file: &HostFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        cache_budget: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let file_len = file.len()?;
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        file.read_exact_at(&mut raw, table_offset)?;
        let mut table = Vec::with_capacity(raw.len() / 8);
        for (i, e) in raw.chunks_exact(8).enumerate() {
            let v = be64(e, 0);
            let off = v & RT_OFFSET_MASK;
            let at = table_offset + i as u64 * 8;
            if v & !RT_OFFSET_MASK != 0 {
                return Err(Error::corrupt(format!(
                    "refcount table entry {v:#x} has reserved bits set"
                ))
                .at(at));
            }
            if !off.is_multiple_of(cs) {
                return Err(Error::corrupt(format!(
                    "refcount block offset {off:#x} is not cluster aligned"
                ))
                .at(at));
            }
            if off != 0 && (off < cs || off.saturating_add(cs) > file_len) {
                return Err(Error::corrupt(format!(
                    "refcount block at {off:#x} lies outside the image"
                ))
                .at(at));
            }
            table.push(off);
        }
        Ok(Refcounts {
            file: file.clone(),
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            table_dirty: false,
            table_moved: false,
            blocks: TableCache::new(cs as usize, cache_budget),
            next_free: file_len.div_ceil(cs),
            frontier: Arc::new(AtomicU64::new(file_len.div_ceil(cs) * cs)),
            pending_free: Vec::new(),
            allocated: 0,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    pub fn entries_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    pub fn get(&self, cluster: u64) -> Result<u64> {
        let epb = self.entries_per_block();
        let idx = cluster / epb;
        let Some(&block) = self.table.get(idx as usize) else {
            return Ok(0);
        };
        if block == 0 {
            return Ok(0);
        }
        let i = (cluster % epb) as usize;
        let order = self.order;
        self.blocks.with(&BlockIo { file: &self.file }, block, |b| {
            block_get(b, i, order)
        })
    }

    pub fn set(&mut self, cluster: u64, v: u64) -> Result<()> {
        if v > self.max_refcount() {
            return Err(Error::unsupported(format!(
                "refcount of cluster {cluster:#x} would overflow {} bits",
                1u32 << self.order
            )));
        }
        let block = self.ensure_block(cluster)?;
        let i = (cluster % self.entries_per_block()) as usize;
        let order = self.order;
        self.blocks
            .with_mut(&BlockIo { file: &self.file }, block, |b| {
                block_set(b, i, order, v)
            })
    }

    /// The block covering `cluster`, allocating it (and growing the table) when missing.
    fn ensure_block(&mut self, cluster: u64) -> Result<u64> {
        let idx = cluster / self.entries_per_block();
        if idx as usize >= self.table.len() {
            self.grow_table(idx + 1)?;
        }
        let off = self.table[idx as usize];
        if off != 0 {
            return Ok(off);
        }
        let b = self.take_free(1)?;
        let boff = b << self.cluster_bits;
        self.table[idx as usize] = boff;
        self.table_dirty = true;
        let zero = vec![0u8; self.cs() as usize].into_boxed_slice();
        self.blocks
            .insert_new(&BlockIo { file: &self.file }, boff, zero)?;
        self.set(b, 1)?;
        Ok(boff)
    }

    /// Reserve `n` contiguous clusters with refcount 0 at the end, without counting them yet.
    fn take_free(&mut self, n: u64) -> Result<u64> {
        let mut start = self.next_free;
        let mut i = 0;
        while i < n {
            if self.get(start + i)? != 0 {
                start += i + 1;
                i = 0;
            } else {
                i += 1;
            }
        }
        if (start + n) >> (56 - self.cluster_bits) != 0 {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                "qcow2 image would grow past 64 PiB",
            ));
        }
        self.next_free = start + n;
        self.frontier
            .fetch_max(self.next_free << self.cluster_bits, Ordering::SeqCst);
        Ok(start)
    }

    /// Allocate `n` contiguous clusters (refcount 1 each); returns the host offset.
    pub fn alloc(&mut self, n: u64) -> Result<u64> {
        let start = self.take_free(n)?;
        for c in start..start + n {
            self.set(c, 1)?;
        }
        self.allocated += n;
        Ok(start << self.cluster_bits)
    }

    /// Replace the table by a larger one at the end of the file.
    fn grow_table(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs();
        let epb = self.entries_per_block();
        let mut entries = min_entries.max(self.table.len() as u64 * 2);
        let (start, clusters) = loop {
            let clusters = (entries * 8).div_ceil(cs);
            let start = self.next_free;
            // Leave room for the blocks describing the new table itself.
            let need = (start + clusters) / epb + 2;
            if need <= entries {
                break (start, clusters);
            }
            entries = need;
        };
        if clusters * cs > MAX_REFTABLE_BYTES.max(cs) * 8 {
            return Err(Error::unsupported("refcount table would grow too large"));
        }
        let start = {
            let s = self.take_free(clusters)?;
            debug_assert!(s >= start);
            s
        };
        let old = (self.table_offset, self.table_clusters);
        self.table.resize((clusters * cs / 8) as usize, 0);
        self.table_offset = start << self.cluster_bits;
        self.table_clusters = clusters;
        self.table_dirty = true;
        self.table_moved = true;
        for c in start..start + clusters {
            self.set(c, 1)?;
        }
        self.defer_free(old.0, old.1 * cs);
        Ok(())
    }

    /// Drop one reference to every cluster touching `[off, off+len)` once the tables that
    /// referenced them are durable.
    pub fn defer_free(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        self.pending_free.push((first, last - first + 1));
    }

    pub fn has_pending_frees(&self) -> bool {
        !self.pending_free.is_empty()
    }

    /// Apply deferred decrements; returns host ranges whose refcount reached 0 (to punch).
    pub fn apply_frees(&mut self) -> Result<Vec<(u64, u64)>> {
        let mut punch = Vec::new();
        let frees = std::mem::take(&mut self.pending_free);
        for (first, n) in frees {
            for c in first..first + n {
                let cur = self.get(c)?;
                if cur == 0 {
                    log::warn!(
                        "qcow2: freeing cluster {:#x} whose refcount is already 0",
                        c << self.cluster_bits
                    );
                    continue;
                }
                self.set(c, cur - 1)?;
                if cur == 1 {
                    punch.push((c << self.cluster_bits, self.cs()));
                }
            }
        }
        Ok(punch)
    }

    /// Make every refcount change durable: blocks, sync, table, sync, header, sync.
    pub fn flush_durable(&mut self) -> Result<()> {
        if self.blocks.is_dirty() {
            self.blocks.flush(&BlockIo { file: &self.file })?;
            self.file.sync()?;
        }
        if self.table_dirty {
            let mut raw = vec![0u8; (self.table_clusters << self.cluster_bits) as usize];
            for (i, e) in self.table.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.file.write_all_at(&raw, self.table_offset)?;
            self.file.sync()?;
            if self.table_moved {
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&self.table_offset.to_be_bytes());
                f[8..].copy_from_slice(&(self.table_clusters as u32).to_be_bytes());
                self.file.write_all_at(&f, OFF_REFCOUNT_TABLE)?;
                self.file.sync()?;
                self.table_moved = false;
            }
            self.table_dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FaultFile;
    use std::path::Path;

    /// 512-byte clusters, 64-bit refcounts (64 per block): header, table at 1, block at 2.
    fn tiny() -> (std::sync::Arc<FaultFile>, HostFile) {
        let mut b = vec![0u8; 3 * 512];
        b[512..520].copy_from_slice(&1024u64.to_be_bytes());
        for c in 0..3 {
            block_set(&mut b[1024..1536], c, 6, 1);
        }
        let f = FaultFile::new(b);
        let h = f.host_file(Path::new("mem"), true);
        (f, h)
    }

    #[test]
    fn alloc_grows_blocks_and_table_and_survives_reload() {
        let (_f, h) = tiny();
        let mut rc = Refcounts::load(&h, 9, 6, 512, 1, 4096).unwrap();
        assert_eq!(rc.next_free, 3);
        // 64 entries per block, 64 blocks per table cluster: 5000 clusters need a bigger table.
        let mut offs = Vec::new();
        for _ in 0..5000 {
            offs.push(rc.alloc(1).unwrap());
        }
        assert!(rc.table_offset != 512 && rc.table_clusters > 1);
        rc.flush_durable().unwrap();
        let punch = rc.apply_frees().unwrap();
        assert_eq!(punch, vec![(512, 512)], "old table freed");
        rc.flush_durable().unwrap();
        let hdr_rt = {
            let mut b = [0u8; 12];
            h.read_exact_at(&mut b, OFF_REFCOUNT_TABLE).unwrap();
            (be64(&b, 0), u32::from_be_bytes([b[8], b[9], b[10], b[11]]))
        };
        assert_eq!(hdr_rt, (rc.table_offset, rc.table_clusters as u32));
        let again = Refcounts::load(&h, 9, 6, rc.table_offset, rc.table_clusters, 4096).unwrap();
        for o in offs {
            assert_eq!(again.get(o >> 9).unwrap(), 1, "cluster {o:#x}");
        }
        assert_eq!(again.get(1).unwrap(), 0);
        // Every block and table cluster is counted.
        for (i, &b) in again.table.iter().enumerate() {
            if b != 0 {
                assert_eq!(again.get(b >> 9).unwrap(), 1, "block {i}");
            }
        }
        for c in 0..again.table_clusters {
            assert_eq!(again.get((again.table_offset >> 9) + c).unwrap(), 1);
        }
    }

    #[test]
    fn hostile_tables_are_errors() {
        for bad in [0x200u64 + 7, 1 << 40, 0x100] {
            let (_f, h) = tiny();
            h.write_all_at(&bad.to_be_bytes(), 512 + 8).unwrap();
            assert!(Refcounts::load(&h, 9, 6, 512, 1, 4096).is_err(), "{bad:#x}");
        }
        let (_f, h) = tiny();
        let mut rc = Refcounts::load(&h, 9, 6, 512, 1, 4096).unwrap();
        assert!(rc.set(5, u64::MAX).is_ok());
        let mut rc1 = Refcounts::load(&h, 9, 0, 512, 1, 4096).unwrap();
        assert!(rc1.set(5, 2).is_err(), "1-bit refcount overflow");
        rc.defer_free(5 << 9, 512);
        rc.defer_free(6 << 9, 512); // refcount already 0: warned, not wrapped
        assert_eq!(rc.apply_frees().unwrap(), vec![]);
        assert_eq!(rc.get(5).unwrap(), u64::MAX - 1);
        assert_eq!(rc.get(6).unwrap(), 0);
    }

    #[test]
    fn entry_packing_all_widths() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut b = vec![0u8; 64];
            let n = 64 * 8 / bits as usize;
            for i in 0..n {
                block_set(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    block_get(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte widths: entry 0 is the least significant bits.
        let mut b = vec![0u8; 1];
        block_set(&mut b, 0, 1, 1);
        block_set(&mut b, 3, 1, 2);
        assert_eq!(b[0], 0b1000_0001);
        let mut b = vec![0u8; 1];
        block_set(&mut b, 1, 2, 0xa);
        assert_eq!(b, [0xa0]);
    }
}
