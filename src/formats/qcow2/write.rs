//! Writes: allocation (refcount first), copy-on-write fills, zero/discard, ordered write-back.
//!
//! ```text
//!   map_write:  L2 table for write (allocate, or COW when shared)
//!               -> cluster in place (copied / refcount 1)  or
//!                  new cluster at the end: fill head/tail from below / zeros / old / decompressed,
//!                  L2 entry -> new | COPIED, old cluster freed later
//!   flush:      extend file -> sync data -> refcount blocks, sync -> refcount table, sync
//!               -> L2 tables, sync -> L1, sync -> deferred frees (refcount -1, punch)
//! ```

use super::entry::OFLAG_COPIED;
use super::header::{
    AUTOCLEAR_DATA_FILE_RAW, EXT_BITMAPS, INCOMPAT_DIRTY, OFF_AUTOCLEAR, OFF_INCOMPAT,
};
use super::map::{Alloc, L2Entry, Sc, Subclusters};
use super::Qcow2Map;
use crate::error::{Error, Result};
use crate::format::{write_fill, Fill};
use crate::format::{Below, Extent};
use std::sync::atomic::Ordering;

/// The cluster one `map_write` writes into: its L2 slot, the entry (and bitmap) found there
/// under the allocation lock, and what is written.
#[derive(Clone, Copy)]
struct Slot<'p> {
    l2_off: u64,
    l2_index: u64,
    e: L2Entry,
    b: Subclusters,
    /// Guest offset of the cluster.
    guest: u64,
    /// Offset of the write in the cluster, and its bytes in this cluster.
    in_c: u64,
    n: u64,
    /// Bytes of the whole request (it may go on in the following clusters).
    len: u64,
    /// The old contents, read before the allocation lock for this very entry.
    pre: Option<&'p [u8]>,
}

enum Src<'a> {
    Below,
    Zeros,
    Bytes(&'a [u8]),
}

fn refcounts(a: &mut Alloc) -> Result<&mut super::refcount::Refcounts> {
    a.rc.as_mut()
        .ok_or_else(|| Error::read_only("snapshot views are read-only"))
}

/// Set or clear the dirty bit in the header, durably.
pub fn set_incompat(map: &Qcow2Map, a: &mut Alloc, dirty: bool) -> Result<()> {
    let v = if dirty {
        a.incompat | INCOMPAT_DIRTY
    } else {
        a.incompat & !INCOMPAT_DIRTY
    };
    let file = &map.m.file;
    file.write_all_at(&v.to_be_bytes(), OFF_INCOMPAT)?;
    file.sync()?;
    a.incompat = v;
    Ok(())
}

/// First-write header updates: clear autoclear bits we do not maintain, mark dirty for lazy
/// refcounts (QEMU's rule), each durable before any other metadata is written.
pub(super) fn prepare(map: &Qcow2Map, a: &mut Alloc) -> Result<()> {
    if map.read_only {
        return Err(Error::read_only("image is open read-only"));
    }
    if a.prepared {
        return Ok(());
    }
    let file = &map.m.file;
    if a.autoclear != 0 {
        let keep = if map.m.geo.external {
            a.autoclear & AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        };
        if keep != a.autoclear {
            file.write_all_at(&keep.to_be_bytes(), OFF_AUTOCLEAR)?;
            file.sync()?;
            a.autoclear = keep;
        }
    }
    if a.bitmaps {
        // The bitmaps are stale from now on (autoclear bit cleared): drop the extension and
        // free their clusters, rather than leave them behind as leaks.
        if let Some(b) = &map.hdr.bitmaps {
            let mut errors = Vec::new();
            let ranges =
                super::check::bitmap_ranges(file, b, map.m.geo.cs, file.len()?, &mut errors);
            super::header::drop_extension(file, &map.hdr, EXT_BITMAPS)?;
            log::warn!(
                "{}: dropped {} stale persistent bitmap(s) on the first write",
                file.path().display(),
                b.nb_bitmaps
            );
            if errors.is_empty() {
                let rc = refcounts(a)?;
                for (off, len) in ranges {
                    rc.defer_free(off, len);
                }
            }
        }
        a.bitmaps = false;
    }
    if map.m.geo.version >= 3 && map.hdr.lazy_refcounts() && a.incompat & INCOMPAT_DIRTY == 0 {
        set_incompat(map, a, true)?;
    }
    a.prepared = true;
    map.m.prepared.store(true, Ordering::SeqCst);
    Ok(())
}

/// The L2 table for `l1_index`, allocated or copied so that it may be modified in place.
fn l2_for_write(map: &Qcow2Map, a: &mut Alloc, l1_index: u64) -> Result<u64> {
    let g = &map.m.geo;
    let e = *map
        .m
        .l1
        .read()
        .entries
        .get(l1_index as usize)
        .ok_or_else(|| Error::invalid("write past the L1 table"))?;
    let off = map.m.l2_offset(l1_index)?;
    if off != 0 && e & OFLAG_COPIED != 0 {
        return Ok(off);
    }
    let table: Box<[u8]> = if off != 0 {
        if refcounts(a)?.get(off >> g.cluster_bits)? == 1 {
            map.m.l1.write().set(l1_index as usize, off | OFLAG_COPIED);
            return Ok(off);
        }
        // Shared with a snapshot: copy the table; its entries are shared too.
        let mut t = map.m.l2.with(&map.m.read_io(), off, |t| t.to_vec())?;
        for e in t.chunks_exact_mut(g.entry_bytes()) {
            e[0] &= 0x7f;
        }
        t.into_boxed_slice()
    } else {
        vec![0u8; g.cs as usize].into_boxed_slice()
    };
    let rc = refcounts(a)?;
    let new = rc.alloc(1)?;
    if off != 0 {
        rc.defer_free(off, g.cs);
    }
    // The table is in the cache before the L1 entry makes it visible.
    map.m.l2.insert_new(&map.m.write_io(a), new, table)?;
    map.m.l1.write().set(l1_index as usize, new | OFLAG_COPIED);
    Ok(new)
}

/// May the data cluster of entry `e` be written in place?
fn owned(map: &Qcow2Map, a: &mut Alloc, e: L2Entry) -> Result<bool> {
    if e.copied() || map.m.geo.external {
        return Ok(true);
    }
    let host = e.host();
    Ok(refcounts(a)?.get(host >> map.m.geo.cluster_bits)? == 1)
}

fn alloc_data(map: &Qcow2Map, a: &mut Alloc, guest_cluster: u64) -> Result<u64> {
    alloc_data_n(map, a, guest_cluster, 1)
}

/// `n` contiguous data clusters for guest clusters starting at `guest_cluster`.
fn alloc_data_n(map: &Qcow2Map, a: &mut Alloc, guest_cluster: u64, n: u64) -> Result<u64> {
    if map.m.geo.external {
        // Data file clusters are not refcounted: host offset = guest offset.
        return Ok(guest_cluster);
    }
    refcounts(a)?.alloc(n)
}

/// How many clusters after the first (at `l2_index`) a write of `len` bytes starting `in_c`
/// into it can take fresh, contiguous clusters for: the following ones it reaches that have no
/// data at all (unallocated or zero without a host cluster), in the same L2 table.
fn fresh_followers(map: &Qcow2Map, l2_off: u64, l2_index: u64, in_c: u64, len: u64) -> Result<u64> {
    let g = &map.m.geo;
    let mut count = 1;
    if g.ext_l2 || in_c + len <= g.cs {
        return Ok(count);
    }
    while count < 256 && l2_index + count < g.l2_entries && count * g.cs - in_c < len {
        let (e, _) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index + count)?;
        if e.compressed() || e.has_host(g.external) {
            break;
        }
        count += 1;
    }
    Ok(count)
}

/// Fill `ranges` (offsets within the cluster) of a newly used cluster from `src`.
fn fill(
    map: &Qcow2Map,
    below: &dyn Below,
    host: u64,
    guest: u64,
    ranges: &[(u64, u64)],
    src: &Src,
    known_zero: bool,
) -> Result<()> {
    for &(s, e) in ranges {
        if s >= e {
            continue;
        }
        let len = (e - s) as usize;
        let fill = match src {
            Src::Zeros => Fill::Zeros,
            Src::Below => Fill::Below {
                below,
                guest: guest + s,
                inside: len,
            },
            Src::Bytes(b) => Fill::Bytes(&b[s as usize..e as usize]),
        };
        write_fill(&map.m.data, host + s, len, fill, known_zero)?;
    }
    Ok(())
}

fn read_cluster(map: &Qcow2Map, host: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; map.m.geo.cs as usize];
    map.m.data.read_zerofill(&mut buf, host)?;
    Ok(buf)
}

fn free_old(map: &Qcow2Map, a: &mut Alloc, e: L2Entry) -> Result<()> {
    let g = &map.m.geo;
    if e.compressed() {
        let (off, len) = e.compressed_ref(g.cluster_bits).refcount_range();
        refcounts(a)?.defer_free(off, len);
        map.m.forget_compressed();
    } else if !g.external && e.host() != 0 {
        refcounts(a)?.defer_free(e.host(), g.cs);
    }
    Ok(())
}

pub fn map_write(map: &Qcow2Map, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
    if map.read_only {
        return Err(Error::read_only("image is open read-only"));
    }
    if let Some(ext) = write_in_place(map, off, len)? {
        return Ok(ext);
    }
    let pre = cow_source(map, off, len, below)?;
    let g = &map.m.geo;
    let mut ag = map.m.lock_alloc();
    let a = &mut *ag;
    prepare(map, a)?;
    let cluster = off >> g.cluster_bits;
    let in_c = off & (g.cs - 1);
    let n = len.min(g.cs - in_c);
    let l1_index = cluster / g.l2_entries;
    let l2_index = cluster % g.l2_entries;
    let l2_off = l2_for_write(map, a, l1_index)?;
    let (e, b) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index)?;
    // Validates the entry.
    map.m.classify(e, b, in_c)?;
    // What was read before the lock, if the entry is still the one it was read for.
    let pre = pre.filter(|(pe, _)| *pe == e).map(|(_, bytes)| bytes);
    let guest = cluster << g.cluster_bits;
    let slot = Slot {
        l2_off,
        l2_index,
        e,
        b,
        guest,
        in_c,
        n,
        len,
        pre: pre.as_deref(),
    };
    if g.ext_l2 && !e.compressed() {
        return write_ext(map, a, below, &slot);
    }
    let host = e.host();
    let compressed = e.compressed();
    let zero = !g.ext_l2 && g.version >= 3 && e.zero_flag();
    let has_host = !compressed && e.has_host(g.external);
    let ranges = [(0, in_c), (in_c + n, g.cs)];
    if has_host && owned(map, a, e)? {
        if zero {
            let known_zero = host >= map.m.data.len()?;
            fill(map, below, host, guest, &ranges, &Src::Zeros, known_zero)?;
        }
        let ne = L2Entry::owned(host);
        if ne != e {
            map.m
                .set_l2_entry(&map.m.write_io(a), l2_off, l2_index, ne, Subclusters::NONE)?;
        }
        let n = if zero {
            n
        } else {
            extend_in_place(map, l2_off, l2_index, host, n, len)?
        };
        return Ok(Extent::Data {
            host: host + in_c,
            len: n,
        });
    }
    let count = fresh_followers(map, l2_off, l2_index, in_c, len)?;
    let new = alloc_data_n(map, a, guest, count)?;
    let known_zero = new >= map.m.data.len()?;
    if count > 1 {
        return write_fresh_run(map, a, below, &slot, new, count, known_zero);
    }
    let old;
    let src = if let Some(bytes) = &pre {
        Src::Bytes(bytes)
    } else if compressed {
        let mut buf = vec![0u8; g.cs as usize];
        map.m.decompress(e, &mut buf)?;
        old = buf;
        Src::Bytes(&old)
    } else if zero {
        Src::Zeros
    } else if has_host {
        old = read_cluster(map, host)?;
        Src::Bytes(&old)
    } else {
        Src::Below
    };
    fill(map, below, new, guest, &ranges, &src, known_zero)?;
    let (ne, nb) = (L2Entry::owned(new), Subclusters::full(g.ext_l2));
    map.m
        .set_l2_entry(&map.m.write_io(a), l2_off, l2_index, ne, nb)?;
    free_old(map, a, e)?;
    Ok(Extent::Data {
        host: new + in_c,
        len: n,
    })
}

/// A write into a cluster this image owns outright (COPIED, plain, every touched subcluster
/// allocated) needs no allocation, so it takes only the lookup's short locks. None: allocate.
fn write_in_place(map: &Qcow2Map, off: u64, len: u64) -> Result<Option<Extent>> {
    // Before the first write's header updates (dirty bit, autoclear), everything goes through
    // the allocation lock.
    if !map.m.prepared.load(Ordering::SeqCst) {
        return Ok(None);
    }
    let g = &map.m.geo;
    let cluster = off >> g.cluster_bits;
    let in_c = off & (g.cs - 1);
    let n = len.min(g.cs - in_c);
    let (l1_index, l2_index) = (cluster / g.l2_entries, cluster % g.l2_entries);
    let l2_off = map.m.l2_offset(l1_index)?;
    if l2_off == 0 {
        return Ok(None);
    }
    let (e, b) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index)?;
    map.m.classify(e, b, in_c)?;
    let host = e.host();
    let plain = e.copied()
        && !e.compressed()
        && (host != 0 || g.external)
        && (g.ext_l2 || g.version < 3 || !e.zero_flag());
    if !plain {
        return Ok(None);
    }
    if g.ext_l2 {
        let (s0, s1) = (in_c / g.sc_size, (in_c + n - 1) / g.sc_size);
        if !b.allocated(s0, s1) {
            return Ok(None);
        }
        return Ok(Some(Extent::Data {
            host: host + in_c,
            len: n,
        }));
    }
    let n = extend_in_place(map, l2_off, l2_index, host, n, len)?;
    Ok(Some(Extent::Data {
        host: host + in_c,
        len: n,
    }))
}

/// The old contents a copy-on-write of the cluster at `off` will copy (backing chain,
/// compressed or shared cluster), read before the allocation lock is taken so that other
/// writers do not wait on this I/O. Paired with the L2 entry it was read for: used only if the
/// entry is unchanged under the lock.
fn cow_source(
    map: &Qcow2Map,
    off: u64,
    len: u64,
    below: &dyn Below,
) -> Result<Option<(L2Entry, Vec<u8>)>> {
    let g = &map.m.geo;
    let cluster = off >> g.cluster_bits;
    let in_c = off & (g.cs - 1);
    if g.ext_l2 || (in_c == 0 && len >= g.cs) {
        return Ok(None); // per-subcluster fills, or nothing of the old cluster survives
    }
    let l2_off = map.m.l2_offset(cluster / g.l2_entries)?;
    let e = if l2_off == 0 {
        L2Entry::UNALLOCATED
    } else {
        let (e, b) = map
            .m
            .l2_entry(&map.m.read_io(), l2_off, cluster % g.l2_entries)?;
        map.m.classify(e, b, in_c)?;
        e
    };
    let host = e.host();
    let guest = cluster << g.cluster_bits;
    let mut buf = vec![0u8; g.cs as usize];
    if e.compressed() {
        map.m.decompress(e, &mut buf)?;
    } else if e.copied() || (g.version >= 3 && e.zero_flag()) {
        return Ok(None); // written in place, or filled with zeros
    } else if host != 0 {
        buf = read_cluster(map, host)?;
    } else if below.zeros_below(guest, g.cs) {
        return Ok(None);
    } else {
        below.read_below(guest, &mut buf)?;
    }
    Ok(Some((e, buf)))
}

/// A write over `count` guest clusters that got contiguous host clusters at `new`: the first
/// may hold data (filled from its source), the others hold none (the last one's tail is filled
/// from below or zeros).
fn write_fresh_run(
    map: &Qcow2Map,
    a: &mut Alloc,
    below: &dyn Below,
    slot: &Slot,
    new: u64,
    count: u64,
    known_zero: bool,
) -> Result<Extent> {
    let Slot {
        l2_off,
        l2_index,
        e: first,
        guest,
        in_c,
        len,
        pre,
        ..
    } = *slot;
    let g = &map.m.geo;
    let cs = g.cs;
    let run = (count * cs - in_c).min(len);
    // Head of the first cluster.
    if in_c > 0 {
        let mut buf = vec![0u8; cs as usize];
        let src = if let Some(bytes) = pre {
            Src::Bytes(bytes)
        } else if first.compressed() {
            map.m.decompress(first, &mut buf)?;
            Src::Bytes(&buf)
        } else if first.has_host(g.external) {
            buf = read_cluster(map, first.host())?;
            Src::Bytes(&buf)
        } else if g.version >= 3 && first.zero_flag() {
            Src::Zeros
        } else {
            Src::Below
        };
        fill(map, below, new, guest, &[(0, in_c)], &src, known_zero)?;
    }
    // Tail of the last cluster.
    let end = in_c + run;
    let last = (end - 1) / cs;
    let tail = end - last * cs;
    if tail < cs {
        let (e, _) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index + last)?;
        let src = if g.version >= 3 && e.zero_flag() {
            Src::Zeros
        } else {
            Src::Below
        };
        let host = new + last * cs;
        fill(
            map,
            below,
            host,
            guest + last * cs,
            &[(tail, cs)],
            &src,
            known_zero,
        )?;
    }
    for i in 0..count {
        map.m.set_l2_entry(
            &map.m.write_io(a),
            l2_off,
            l2_index + i,
            L2Entry::owned(new + i * cs),
            Subclusters::NONE,
        )?;
    }
    free_old(map, a, first)?;
    Ok(Extent::Data {
        host: new + in_c,
        len: run,
    })
}

/// Grow an in-place run over following clusters that are owned and contiguous on the host.
fn extend_in_place(
    map: &Qcow2Map,
    l2_off: u64,
    l2_index: u64,
    host: u64,
    mut n: u64,
    len: u64,
) -> Result<u64> {
    let g = &map.m.geo;
    let mut k = 1;
    while n < len && l2_index + k < g.l2_entries {
        let (e, b) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index + k)?;
        let plain = !e.compressed() && !e.zero_flag() && e.copied();
        let all_alloc = !g.ext_l2 || b.all_allocated();
        if !plain || !all_alloc || e.host() != host + k * g.cs {
            break;
        }
        n += (len - n).min(g.cs);
        k += 1;
    }
    Ok(n)
}

/// A write into a standard cluster with extended L2 entries: allocate per subcluster.
fn write_ext(map: &Qcow2Map, a: &mut Alloc, below: &dyn Below, slot: &Slot) -> Result<Extent> {
    let Slot {
        l2_off,
        l2_index,
        e,
        b,
        guest,
        in_c,
        n,
        ..
    } = *slot;
    let g = &map.m.geo;
    let host = e.host();
    let has_host = e.has_host(g.external);
    let is_owned = has_host && owned(map, a, e)?;
    let (target, copied_from) = if is_owned {
        (host, None)
    } else {
        let new = alloc_data(map, a, guest)?;
        (new, has_host.then_some(host))
    };
    let known_zero = copied_from.is_none() && !is_owned && target >= map.m.data.len()?;
    if let Some(old) = copied_from {
        let buf = read_cluster(map, old)?;
        map.m.data.write_all_at(&buf, target)?;
    }
    let scs = g.sc_size;
    let s0 = in_c / scs;
    let s1 = (in_c + n - 1) / scs;
    let mut edges = vec![s0];
    if s1 != s0 {
        edges.push(s1);
    }
    for sc in edges {
        let state = b.state(sc);
        if state == Sc::Allocated {
            continue;
        }
        let (lo, hi) = (sc * scs, (sc + 1) * scs);
        let ranges = [(lo, in_c.max(lo).min(hi)), ((in_c + n).max(lo), hi)];
        let src = if state == Sc::Zero {
            Src::Zeros
        } else {
            Src::Below
        };
        fill(map, below, target, guest, &ranges, &src, known_zero)?;
    }
    let nb = b.allocate(s0, s1);
    let ne = L2Entry::owned(target);
    if (ne, nb) != (e, b) {
        map.m
            .set_l2_entry(&map.m.write_io(a), l2_off, l2_index, ne, nb)?;
    }
    if copied_from.is_some() {
        free_old(map, a, e)?;
    }
    Ok(Extent::Data {
        host: target + in_c,
        len: n,
    })
}

/// Make whole clusters read as zeros through metadata. Ok(false) where qcow2 cannot say it.
pub fn write_zeroes(map: &Qcow2Map, off: u64, len: u64, unmap: bool) -> Result<bool> {
    let g = &map.m.geo;
    if g.data_raw || (g.version < 3 && g.has_backing) {
        return Ok(false);
    }
    if !off.is_multiple_of(g.cs) || !len.is_multiple_of(g.cs) {
        return Ok(false);
    }
    let mut ag = map.m.lock_alloc();
    let a = &mut *ag;
    prepare(map, a)?;
    let mut cluster = off >> g.cluster_bits;
    let end = (off + len) >> g.cluster_bits;
    while cluster < end {
        let l1_index = cluster / g.l2_entries;
        let l2_index = cluster % g.l2_entries;
        if !g.has_backing && map.m.l2_offset(l1_index)? == 0 {
            // The whole table is unallocated and reads as zeros already.
            cluster += g.l2_entries - l2_index;
            continue;
        }
        let l2_off = l2_for_write(map, a, l1_index)?;
        let (e, b) = map.m.l2_entry(&map.m.read_io(), l2_off, l2_index)?;
        map.m.classify(e, b, 0)?;
        let (ne, nb) = zeroed_entry(map, a, e, unmap)?;
        if (ne, nb) != (e, b) {
            map.m
                .set_l2_entry(&map.m.write_io(a), l2_off, l2_index, ne, nb)?;
        }
        cluster += 1;
    }
    Ok(true)
}

/// The entry (and bitmap) of a cluster after zeroing it; frees what is no longer used.
fn zeroed_entry(
    map: &Qcow2Map,
    a: &mut Alloc,
    e: L2Entry,
    unmap: bool,
) -> Result<(L2Entry, Subclusters)> {
    let g = &map.m.geo;
    let host = e.host();
    let compressed = e.compressed();
    let has_host = !compressed && e.has_host(g.external);
    let keep = !unmap && has_host && g.version >= 3 && owned(map, a, e)?;
    if keep {
        return Ok(if g.ext_l2 {
            (L2Entry::owned(host), Subclusters::ALL_ZERO)
        } else {
            (L2Entry::owned(host).with_zero_flag(), Subclusters::NONE)
        });
    }
    if has_host || compressed {
        free_old(map, a, e)?;
    }
    let need_flag = g.has_backing || g.external;
    let none = L2Entry::UNALLOCATED;
    Ok(match (g.ext_l2, need_flag && g.version >= 3) {
        (true, true) => (none, Subclusters::ALL_ZERO),
        (true, false) => (none, Subclusters::NONE),
        (false, true) => (L2Entry::ZERO, Subclusters::NONE),
        (false, false) => (none, Subclusters::NONE),
    })
}

/// Everything durable, in the safe order. Runs under the allocation lock (writers that
/// allocate wait); lookups and in-place writes go on: the L2 cache writes back snapshots of its
/// dirty tables outside its lock, and the L1 lock is held only to copy the changed entries.
pub fn flush(map: &Qcow2Map, a: &mut Alloc) -> Result<()> {
    if map.read_only || a.rc.is_none() {
        return Ok(());
    }
    let g = &map.m.geo;
    let file = &map.m.file;
    let end = refcounts(a)?.next_free << g.cluster_bits;
    if file.len()? < end {
        file.set_len(end)?;
    }
    if g.external {
        map.m.data.sync()?;
    }
    file.sync()?;
    refcounts(a)?.flush_durable()?;
    if map.m.l2.is_dirty() {
        let io = map.m.write_io(a);
        io.deps_done.set(true);
        map.m.l2.flush(&io)?;
        file.sync()?;
    }
    let changed = {
        let mut l1 = map.m.l1.write();
        l1.dirty.take().map(|(a, b)| {
            // Whole 512-byte sectors around the changed entries.
            let a = a / 64 * 64;
            let b = (b.div_ceil(64) * 64).min(l1.entries.len());
            let raw: Vec<u8> = l1.entries[a..b]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            (a, b, l1.offset + a as u64 * 8, raw)
        })
    };
    if let Some((lo, hi, at, raw)) = changed {
        if let Err(e) = file.write_all_at(&raw, at).and_then(|_| file.sync()) {
            let mut l1 = map.m.l1.write();
            l1.dirty = Some(l1.dirty.map_or((lo, hi), |(x, y)| (x.min(lo), y.max(hi))));
            return Err(e);
        }
    }
    let rc = refcounts(a)?;
    if rc.has_pending_frees() {
        let punch = rc.apply_frees()?;
        rc.flush_durable()?;
        for (off, len) in punch {
            file.punch_hole(off, len)?;
        }
    }
    Ok(())
}

/// Allocate every cluster of the image (preallocation=metadata).
pub fn preallocate(map: &Qcow2Map) -> Result<()> {
    let g = &map.m.geo;
    let mut ag = map.m.lock_alloc();
    let a = &mut *ag;
    prepare(map, a)?;
    let clusters = map
        .size
        .load(std::sync::atomic::Ordering::Acquire)
        .div_ceil(g.cs);
    for cluster in 0..clusters {
        let l2_off = l2_for_write(map, a, cluster / g.l2_entries)?;
        let host = alloc_data(map, a, cluster << g.cluster_bits)?;
        map.m.set_l2_entry(
            &map.m.write_io(a),
            l2_off,
            cluster % g.l2_entries,
            L2Entry::owned(host),
            Subclusters::full(g.ext_l2),
        )?;
    }
    flush(map, a)
}
