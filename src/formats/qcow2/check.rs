//! The refcount walker: count every reference to every cluster (header, tables, data of the
//! active state and of each snapshot, bitmaps), compare with the stored refcounts, and repair.
//! Used by `Format::check` and to rebuild refcounts of an image left dirty (lazy refcounts).

use super::entry::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COPIED};
use super::header::{BitmapsExt, Header, INCOMPAT_DIRTY, OFF_INCOMPAT};
use super::map::{self, Alloc};
use super::refcount::Refcounts;
use super::{read_header, snapshot, Qcow2Map};
use crate::error::{Error, Result};
use crate::format::{CheckReport, Repair};
use crate::formats::{be32, be64};
use crate::host::HostFile;

#[derive(Default)]
pub struct Walk {
    /// References per cluster, indexed by cluster number (only clusters inside the file).
    pub counts: Vec<u32>,
    pub corruptions: u64,
    pub messages: Vec<String>,
    /// (cluster, COPIED flag set, what) for entries reachable from the active L1.
    copied: Vec<(u64, bool, String)>,
    pub guest_allocated: u64,
}

impl Walk {
    pub fn count(&self, c: u64) -> u64 {
        self.counts.get(c as usize).map_or(0, |&n| u64::from(n))
    }
}

struct Walker<'a> {
    file: &'a HostFile,
    h: &'a Header,
    file_len: u64,
    w: Walk,
}

impl Walker<'_> {
    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    /// Count one reference to every cluster touching `[off, off+len)`. Clusters that start past
    /// the end of the file are errors (imgfs extends the file before any table may point
    /// there) and are not counted, so a repair never allocates at absurd offsets.
    fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cb = self.h.cluster_bits;
        let Some(last) = off.checked_add(len - 1) else {
            self.error(format!("reference to {off:#x}+{len:#x} overflows"));
            return;
        };
        for c in off >> cb..=last >> cb {
            if c << cb >= self.file_len {
                self.error(format!(
                    "cluster {:#x} is referenced but lies past the end of the file",
                    c << cb
                ));
                return;
            }
            let n = &mut self.w.counts[c as usize];
            *n = n.saturating_add(1);
        }
    }
    fn error(&mut self, msg: String) {
        self.w.corruptions += 1;
        self.w.messages.push(format!("ERROR {msg}"));
    }

    fn l1(&mut self, l1: &[u64], active: bool) {
        for (i, &e) in l1.iter().enumerate() {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(self.cs()) || off + self.cs() > self.file_len {
                self.error(format!("L1 entry {i}: L2 table at {off:#x} is invalid"));
                continue;
            }
            self.inc(off, self.cs());
            if active {
                let what = format!("L2 table at {off:#x}");
                self.w
                    .copied
                    .push((off >> self.h.cluster_bits, e & OFLAG_COPIED != 0, what));
            }
            let mut t = vec![0u8; self.cs() as usize];
            if let Err(err) = self.file.read_exact_at(&mut t, off) {
                self.error(format!("cannot read L2 table at {off:#x}: {err}"));
                continue;
            }
            self.l2(&t, off, active);
        }
    }

    fn l2(&mut self, t: &[u8], l2_off: u64, active: bool) {
        let ext = self.h.extended_l2();
        let cs = self.cs();
        for i in 0..self.h.l2_entries() {
            let (e, _) = map::entry_at(t, i, ext);
            if e.compressed() {
                if self.h.has_data_file() {
                    self.error(format!(
                        "compressed cluster in L2 at {l2_off:#x} with a data file"
                    ));
                    continue;
                }
                let (off, len) = e.compressed_ref(self.h.cluster_bits).refcount_range();
                self.inc(off, len);
                if active {
                    self.w.guest_allocated += 1;
                }
                continue;
            }
            let host = e.host();
            if host == 0 {
                if active && self.h.has_data_file() && e.copied() {
                    self.w.guest_allocated += 1;
                }
                continue;
            }
            if !host.is_multiple_of(cs) {
                self.error(format!(
                    "L2 entry {i} at {l2_off:#x}: offset {host:#x} unaligned"
                ));
                continue;
            }
            if active {
                self.w.guest_allocated += 1;
            }
            if self.h.has_data_file() {
                continue;
            }
            self.inc(host, cs);
            if active {
                let what = format!("data cluster at {host:#x}");
                self.w
                    .copied
                    .push((host >> self.h.cluster_bits, e.copied(), what));
            }
        }
    }

    fn bitmaps(&mut self) {
        let Some(b) = self.h.bitmaps.clone() else {
            return;
        };
        let mut errors = Vec::new();
        for (off, len) in bitmap_ranges(self.file, &b, self.cs(), self.file_len, &mut errors) {
            self.inc(off, len);
        }
        for e in errors {
            self.error(e);
        }
    }
}

/// Host ranges used by the bitmaps extension: directory, bitmap tables, bitmap data clusters.
pub fn bitmap_ranges(
    file: &HostFile,
    b: &BitmapsExt,
    cs: u64,
    file_len: u64,
    errors: &mut Vec<String>,
) -> Vec<(u64, u64)> {
    let mut out = vec![(b.directory_offset, b.directory_size)];
    let mut dir = vec![0u8; b.directory_size as usize];
    if let Err(err) = file.read_exact_at(&mut dir, b.directory_offset) {
        errors.push(format!("cannot read bitmap directory: {err}"));
        return out;
    }
    let mut pos = 0usize;
    while pos + 24 <= dir.len() {
        let table_off = be64(&dir, pos);
        let table_size = u64::from(be32(&dir, pos + 8));
        let name_size = usize::from(u16::from_be_bytes([dir[pos + 18], dir[pos + 19]]));
        let extra = be32(&dir, pos + 20) as usize;
        pos += (24 + name_size + extra).div_ceil(8) * 8;
        if table_off == 0 || table_size == 0 {
            continue;
        }
        if table_size * 8 > (64 << 20) || table_off.saturating_add(table_size * 8) > file_len {
            errors.push(format!("bitmap table at {table_off:#x} is invalid"));
            continue;
        }
        out.push((table_off, table_size * 8));
        let mut t = vec![0u8; (table_size * 8) as usize];
        if file.read_exact_at(&mut t, table_off).is_err() {
            continue;
        }
        for c in t.chunks_exact(8) {
            // A bitmap table entry keeps its data cluster in the bits an L2 entry does.
            let off = be64(c, 0) & L2E_OFFSET_MASK;
            if off != 0 {
                out.push((off, cs));
            }
        }
    }
    out
}

/// Count every reference in the image as stored on disk.
pub fn walk(file: &HostFile, h: &Header, l1: &[u64], rc: &Refcounts) -> Result<Walk> {
    let file_len = file.len()?;
    let mut wk = Walker {
        file,
        h,
        file_len,
        w: Walk {
            counts: vec![0; file_len.div_ceil(h.cluster_size()) as usize],
            ..Walk::default()
        },
    };
    let cs = h.cluster_size();
    wk.inc(0, cs);
    wk.inc(h.l1_table_offset, l1.len() as u64 * 8);
    wk.l1(l1, true);
    wk.inc(rc.table_offset, rc.table_clusters * cs);
    for &b in &rc.table {
        if b != 0 {
            wk.inc(b, cs);
        }
    }
    match snapshot::read_table(file, h) {
        Ok((snaps, len)) => {
            wk.inc(h.snapshots_offset, len);
            for s in snaps {
                wk.inc(s.l1_table_offset, u64::from(s.l1_size) * 8);
                match map::read_l1(file, s.l1_table_offset, s.l1_size, cs) {
                    Ok(sl1) => wk.l1(&sl1, false),
                    Err(e) => wk.error(format!("snapshot {:?}: {e}", s.name)),
                }
            }
        }
        Err(e) => wk.error(format!("snapshot table: {e}")),
    }
    wk.bitmaps();
    Ok(wk.w)
}

/// (cluster, stored, referenced) for every cluster where they differ.
fn mismatches(w: &Walk, rc: &Refcounts) -> Result<Vec<(u64, u64, u64)>> {
    let epb = rc.entries_per_block();
    let mut out = Vec::new();
    for (idx, &b) in rc.table.iter().enumerate() {
        if b == 0 {
            continue;
        }
        for i in 0..epb {
            let c = idx as u64 * epb + i;
            let stored = rc.get(c)?;
            let want = w.count(c);
            if stored != want {
                out.push((c, stored, want));
            }
        }
    }
    for (c, &want) in w.counts.iter().enumerate() {
        let (c, want) = (c as u64, u64::from(want));
        if want == 0 {
            continue;
        }
        let idx = (c / epb) as usize;
        if rc.table.get(idx).is_none_or(|&b| b == 0) {
            out.push((c, 0, want));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Set refcounts to the referenced counts (`leaks_only`: only lower them).
fn fix(rc: &mut Refcounts, w: &Walk, mism: &[(u64, u64, u64)], leaks_only: bool) -> Result<u64> {
    // New refcount blocks must land past everything that is referenced.
    let top = w.counts.len() as u64;
    rc.next_free = rc.next_free.max(top);
    rc.frontier.fetch_max(
        rc.next_free << rc.cluster_bits(),
        std::sync::atomic::Ordering::SeqCst,
    );
    let mut fixed = 0;
    for &(c, stored, want) in mism {
        if leaks_only && want > stored {
            continue;
        }
        rc.set(c, want)?;
        fixed += 1;
    }
    rc.flush_durable()?;
    Ok(fixed)
}

/// Rebuild the refcounts of an open image (dirty at open), before anything else is written.
pub fn rebuild(map: &Qcow2Map, a: &mut Alloc) -> Result<()> {
    let file = &map.m.file;
    let rc =
        a.rc.as_mut()
            .ok_or_else(|| Error::read_only("no refcounts in a snapshot view"))?;
    let w = walk(file, &map.hdr, &map.m.l1.read().entries, rc)?;
    let mism = mismatches(&w, rc)?;
    if !mism.is_empty() {
        log::info!(
            "{}: rebuilding {} refcounts of a dirty qcow2 image",
            file.path().display(),
            mism.len()
        );
    }
    fix(rc, &w, &mism, false)?;
    Ok(())
}

/// qemu-img check: report leaks and corruptions, and repair them when asked.
pub fn check_file(file: HostFile, repair: Repair) -> Result<CheckReport> {
    let h = read_header(&file)?;
    let cs = h.cluster_size();
    let l1 = map::read_l1(&file, h.l1_table_offset, h.l1_size, cs)?;
    let mut rc = Refcounts::load(
        &file,
        h.cluster_bits,
        h.refcount_order,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters),
        4 << 20,
    )?;
    let w = walk(&file, &h, &l1, &rc)?;
    let mism = mismatches(&w, &rc)?;
    let mut r = CheckReport {
        corruptions: w.corruptions,
        messages: w.messages.clone(),
        allocated_clusters: w.guest_allocated,
        total_clusters: h.size.div_ceil(cs),
        ..CheckReport::default()
    };
    for &(c, stored, want) in &mism {
        let kind = if stored > want {
            "Leaked cluster"
        } else {
            "ERROR cluster"
        };
        r.messages
            .push(format!("{kind} {c} refcount={stored} reference={want}"));
        if stored > want {
            r.leaks += 1;
        } else {
            r.corruptions += 1;
        }
    }
    let counts = &w;
    for (c, copied, what) in &w.copied {
        let n = counts.count(*c);
        if *copied != (n == 1) {
            r.corruptions += 1;
            r.messages.push(format!(
                "ERROR OFLAG_COPIED {what}: copied={copied} refcount={n}"
            ));
        }
    }
    if repair != Repair::None && !mism.is_empty() {
        let leaks_only = repair == Repair::Leaks;
        fix(&mut rc, &w, &mism, leaks_only)?;
        r.leaks_fixed = r.leaks;
        if !leaks_only {
            r.corruptions_fixed = mism.iter().filter(|(_, s, w)| w > s).count() as u64;
        }
    }
    if repair != Repair::None && h.is_dirty() && r.corruptions == r.corruptions_fixed {
        let v = h.incompatible & !INCOMPAT_DIRTY;
        file.write_all_at(&v.to_be_bytes(), OFF_INCOMPAT)?;
        file.sync()?;
    }
    Ok(r)
}
