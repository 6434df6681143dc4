//! QED allocating writes and zero clusters. All metadata changes run under the allocation lock;
//! in-place writes to allocated clusters never take it.
//!
//! ```text
//!  allocating write of [off, end) over n clusters (new at the end of the file):
//!   | head fill | guest bytes (engine writes) | tail fill |
//!   ^ cluster start                                       ^ end of the n-th cluster
//!   fill = zeros for a zero cluster (spec), the backing chain for an unallocated one
//! ```

use super::table::{self, Entry};
use super::{Alloc, QedMap};
use crate::error::Result;
use crate::format::{write_fill, Fill, Prefetched};
use crate::format::{Below, Extent};
use std::sync::atomic::Ordering;

impl QedMap {
    /// Allocate data clusters for `[off, off+len)` (one L2 table at most) and fill the parts the
    /// guest write does not cover.
    pub(super) fn allocate(
        &self,
        off: u64,
        len: u64,
        below: &dyn Below,
        pre: Option<&Prefetched>,
    ) -> Result<Extent> {
        let mut a = self.lock_alloc();
        self.set_need_check(&mut a, true)?;
        let g = self.geo;
        let l2 = self.l2_table_for_write(&mut a, off)?;
        // Another writer may have allocated this cluster meanwhile.
        let run = self.run_in(l2, off, len)?;
        if let Entry::Data(host) = run.first {
            return Ok(Extent::Data {
                host: host + g.in_cluster(off),
                len: run.len,
            });
        }
        // Clusters to allocate: every non-data cluster touched by the write, up to the table end.
        let cs = g.cluster_size;
        let cstart = off - g.in_cluster(off);
        let want_end = (off + len.min(g.left_in_table(off))).div_ceil(cs) * cs;
        let first = g.l2_index(off);
        let mut kinds = vec![run.first];
        let mut pos = cstart + cs;
        while pos < want_end {
            let r = self.run_in(l2, pos, cs)?;
            if matches!(r.first, Entry::Data(_)) {
                break;
            }
            kinds.push(r.first);
            pos += cs;
        }
        let n = kinds.len() as u64;
        let run_end = cstart + n * cs;
        let host = a.file_end;
        let host_end = host + n * cs;
        let data_end = (off + len).min(run_end);
        // Head and tail fills, before anything points at the new clusters.
        self.fill(&a, host, cstart, off - cstart, run.first, below, pre)?;
        let tail_kind = kinds[kinds.len() - 1];
        self.fill(
            &a,
            host + (data_end - cstart),
            data_end,
            run_end - data_end,
            tail_kind,
            below,
            pre,
        )?;
        if a.file_len < host_end {
            self.file.set_len(host_end)?;
            a.file_len = host_end;
        }
        a.file_end = host_end;
        self.file_size.store(host_end, Ordering::SeqCst);
        // The fills must be durable before a stored L2 table can point at them.
        self.io.needs_sync.store(true, Ordering::SeqCst);
        self.l2.with_mut(&self.io, l2, |t| {
            for i in 0..n {
                table::set_entry(t, first + i as usize, host + i * cs);
            }
        })?;
        self.clusters_allocated.fetch_add(n, Ordering::Relaxed);
        Ok(Extent::Data {
            host: host + (off - cstart),
            len: data_end - off,
        })
    }

    /// Write `len` fill bytes for guest offset `guest` at host offset `host`: zeros for a zero
    /// cluster, the backing chain for an unallocated one (`pre` when it was read before the
    /// lock). Zeros past the end of the file are skipped (they read as zeros already).
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        a: &Alloc,
        host: u64,
        guest: u64,
        len: u64,
        kind: Entry,
        below: &dyn Below,
        pre: Option<&Prefetched>,
    ) -> Result<()> {
        let fill = if kind == Entry::Unalloc {
            Prefetched::fill(pre, below, guest, len, self.size.load(Ordering::Acquire))
        } else {
            Fill::Zeros
        };
        write_fill(&self.file, host, len as usize, fill, host >= a.file_len)
    }

    /// The L2 table for `off`, allocating a zeroed one at the end of the file when needed.
    fn l2_table_for_write(&self, a: &mut Alloc, off: u64) -> Result<u64> {
        if let Some(l2) = self.l2_for(off)? {
            return Ok(l2);
        }
        let l2 = a.file_end;
        let end = l2 + self.geo.table_bytes;
        a.file_end = end;
        self.file_size.store(end, Ordering::SeqCst);
        let zeroed = vec![0u8; self.geo.table_bytes as usize].into_boxed_slice();
        self.l2.insert_new(&self.io, l2, zeroed)?;
        let idx = self.geo.l1_index(off);
        self.l1.write()[idx] = l2;
        self.l1_dirty.store(true, Ordering::SeqCst);
        Ok(l2)
    }

    /// Make whole clusters read as zeros: allocated clusters are zeroed in place (punched when
    /// `unmap`), unallocated ones become zero clusters when a backing file could show through.
    pub(super) fn zero_clusters(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        let mut a = self.lock_alloc();
        let cs = self.geo.cluster_size;
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let run = self.run_at(pos, end - pos)?;
            match run.first {
                Entry::Zero => {}
                Entry::Data(host) => {
                    if unmap {
                        self.file.punch_hole(host, run.len)?;
                    } else {
                        self.file.write_zeroes(host, run.len)?;
                    }
                }
                Entry::Unalloc if self.backing.is_none() => {}
                Entry::Unalloc => {
                    self.set_need_check(&mut a, true)?;
                    let l2 = self.l2_table_for_write(&mut a, pos)?;
                    let first = self.geo.l2_index(pos);
                    let n = run.len.div_ceil(cs) as usize;
                    self.l2.with_mut(&self.io, l2, |t| {
                        for i in first..first + n {
                            table::set_entry(t, i, 1);
                        }
                    })?;
                }
            }
            pos += run.len;
        }
        Ok(())
    }
}
