//! TableCache: an LRU of fixed-size metadata tables (qcow2/qcow L2 tables and refcount blocks,
//! QED tables, VHDX BAT pages) keyed by their host offset, with dirty tracking.
//!
//! Lock model: a table is an immutable, reference-counted page (`Arc<[u8]>`). A hit clones the
//! page under a short lock and runs the caller's closure outside it, so readers never queue
//! behind each other. A miss loads the table with no lock held (two loaders racing: the first
//! insert wins). `with_mut` changes a page in place when no reader holds it, else copies it
//! (readers keep the version they took). Nothing does I/O under the cache's lock: write-back
//! takes a snapshot of the dirty pages, stores them outside the lock, and marks a page clean
//! only if it was not changed meanwhile. Readers (`with`) never write anything back: they evict
//! only clean tables; dirty ones are written back by writers (`with_mut`, `insert_new`) and
//! `flush`.
//!
//! The cache never decides write-back order by itself. Writing a dirty table goes through the
//! format's `TableIo::store`, which first makes whatever the table depends on durable (data
//! clusters, refcount blocks, a log entry) — QEMU's "cache dependency" idea. `flush` writes every
//! dirty table through the same path; the format calls flushes of its caches in its safe order.
//! Stores of one cache are serialised (one store lock), so an older snapshot of a table never
//! lands on disk after a newer one.

use crate::error::Result;
use lru::LruCache;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How a format loads and stores one kind of table.
pub trait TableIo {
    /// Fill `buf` with the table at host offset `off`.
    fn load(&self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Write a dirty table back. Must make the table's dependencies durable first.
    fn store(&self, off: u64, buf: &[u8]) -> Result<()>;
}

/// Write a table back, first syncing `file` when `needs_sync` says data the table may point at
/// is not durable yet (the flag stays set if that sync fails). For `TableIo::store`.
pub fn store_after_sync(
    file: &crate::host::HostFile,
    needs_sync: &std::sync::atomic::AtomicBool,
    off: u64,
    buf: &[u8],
) -> Result<()> {
    if needs_sync.swap(false, Ordering::SeqCst) {
        if let Err(e) = file.sync() {
            needs_sync.store(true, Ordering::SeqCst);
            return Err(e);
        }
    }
    file.write_all_at(buf, off)
}

struct Slot {
    data: Arc<[u8]>,
    dirty: bool,
    /// Bumped on every change: a write-back marks the slot clean only if it stored this version.
    version: u64,
}

struct Slots {
    lru: LruCache<u64, Slot>,
    cap: usize,
    /// Bumped whenever a table is dropped or replaced, so that a load that started earlier
    /// (and may have read an older version from disk) is not inserted.
    changes: u64,
}

impl Slots {
    /// Drop least recently used clean tables while over capacity (no I/O), never `keep` (the
    /// table being handed out).
    fn evict_clean(&mut self, evictions: &AtomicU64, keep: Option<u64>) {
        while self.lru.len() > self.cap {
            let Some(off) = self
                .lru
                .iter()
                .rev()
                .find(|(k, s)| !s.dirty && Some(**k) != keep)
                .map(|(k, _)| *k)
            else {
                return;
            };
            self.lru.pop(&off);
            evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub writebacks: u64,
}

pub struct TableCache {
    slots: Mutex<Slots>,
    /// Held across every `TableIo::store` of this cache (never while `slots` is held).
    store_lock: Mutex<()>,
    table_size: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    writebacks: AtomicU64,
}

impl TableCache {
    /// A cache of tables of `table_size` bytes holding at most `budget_bytes` (at least 2 tables;
    /// more while every table is dirty, until a writer or `flush` writes them back).
    pub fn new(table_size: usize, budget_bytes: u64) -> TableCache {
        let cap = (budget_bytes / table_size.max(1) as u64).clamp(2, 1 << 24) as usize;
        TableCache {
            slots: Mutex::new(Slots {
                lru: LruCache::unbounded(),
                cap,
                changes: 0,
            }),
            store_lock: Mutex::new(()),
            table_size,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            writebacks: AtomicU64::new(0),
        }
    }

    pub fn table_size(&self) -> usize {
        self.table_size
    }
    pub fn capacity(&self) -> usize {
        self.slots.lock().cap
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            writebacks: self.writebacks.load(Ordering::Relaxed),
        }
    }

    /// The current version of the table at `off`, loaded on a miss. The page never changes:
    /// a later `with_mut` makes a new one.
    pub fn get(&self, io: &dyn TableIo, off: u64) -> Result<Arc<[u8]>> {
        loop {
            let changes = {
                let mut s = self.slots.lock();
                if let Some(slot) = s.lru.get(&off) {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(slot.data.clone());
                }
                s.changes
            };
            self.misses.fetch_add(1, Ordering::Relaxed);
            let mut buf = vec![0u8; self.table_size];
            io.load(off, &mut buf)?;
            let data: Arc<[u8]> = buf.into();
            let mut s = self.slots.lock();
            if let Some(slot) = s.lru.get(&off) {
                return Ok(slot.data.clone()); // another loader won
            }
            if s.changes != changes {
                continue; // a table was dropped or replaced meanwhile: what we read may be stale
            }
            s.lru.put(
                off,
                Slot {
                    data: data.clone(),
                    dirty: false,
                    version: 0,
                },
            );
            s.evict_clean(&self.evictions, Some(off));
            return Ok(data);
        }
    }

    /// Run `f` on the table at `off`, loading it on a miss. `f` runs with no lock held.
    pub fn with<R>(&self, io: &dyn TableIo, off: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        Ok(f(&self.get(io, off)?))
    }

    /// Run `f` on the table at `off` for modification; the table becomes dirty. `f` runs under
    /// the cache's lock: it must be short and do no I/O. Callers serialise their modifications
    /// (the format's allocation lock); readers see the old or the new version, never a mix.
    pub fn with_mut<R>(
        &self,
        io: &dyn TableIo,
        off: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        let r = loop {
            self.get(io, off)?;
            let mut s = self.slots.lock();
            let Some(slot) = s.lru.get_mut(&off) else {
                continue; // evicted between the load and now
            };
            if Arc::get_mut(&mut slot.data).is_none() {
                slot.data = Arc::from(&slot.data[..]); // a reader holds it: copy on write
            }
            let data = Arc::get_mut(&mut slot.data).expect("unique after the copy");
            slot.dirty = true;
            slot.version += 1;
            break f(data);
        };
        self.trim(io)?;
        Ok(r)
    }

    /// Put a freshly built table (e.g. a newly allocated, zeroed L2) in the cache as dirty.
    pub fn insert_new(&self, io: &dyn TableIo, off: u64, data: Box<[u8]>) -> Result<()> {
        debug_assert_eq!(data.len(), self.table_size);
        {
            let mut s = self.slots.lock();
            let version = s.lru.peek(&off).map_or(0, |old| old.version) + 1;
            s.lru.put(
                off,
                Slot {
                    data: data.into(),
                    dirty: true,
                    version,
                },
            );
            s.changes += 1;
        }
        self.trim(io)
    }

    /// Forget a table without writing it (its cluster was freed, or it was rewritten on disk).
    pub fn discard(&self, off: u64) {
        let mut s = self.slots.lock();
        s.lru.pop(&off);
        s.changes += 1;
    }

    /// Forget every table; dirty ones are lost. Used after a failed open or for re-reads.
    pub fn clear(&self) {
        let mut s = self.slots.lock();
        s.lru.clear();
        s.changes += 1;
    }

    pub fn is_dirty(&self) -> bool {
        self.slots.lock().lru.iter().any(|(_, s)| s.dirty)
    }

    /// Write every dirty table through `io.store` (ascending host offset). Does not sync. Holds
    /// no lock readers need while it writes.
    pub fn flush(&self, io: &dyn TableIo) -> Result<()> {
        let _store = self.store_lock.lock();
        let mut dirty: Vec<(u64, Arc<[u8]>, u64)> = self
            .slots
            .lock()
            .lru
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, s)| (*k, s.data.clone(), s.version))
            .collect();
        dirty.sort_unstable_by_key(|d| d.0);
        for (off, data, version) in dirty {
            io.store(off, &data)?;
            self.writebacks.fetch_add(1, Ordering::Relaxed);
            self.mark_clean(off, version);
        }
        Ok(())
    }

    fn mark_clean(&self, off: u64, version: u64) {
        let mut s = self.slots.lock();
        if let Some(slot) = s.lru.peek_mut(&off) {
            if slot.version == version {
                slot.dirty = false;
            }
        }
    }

    /// Back under capacity: drop clean tables, writing the least recently used dirty ones back
    /// first when there are no clean ones left.
    fn trim(&self, io: &dyn TableIo) -> Result<()> {
        loop {
            let victim = {
                let mut s = self.slots.lock();
                s.evict_clean(&self.evictions, None);
                if s.lru.len() <= s.cap {
                    return Ok(());
                }
                s.lru.peek_lru().map(|(k, _)| *k)
            };
            let Some(off) = victim else {
                return Ok(());
            };
            let _store = self.store_lock.lock();
            let snapshot = {
                let s = self.slots.lock();
                s.lru
                    .peek(&off)
                    .filter(|slot| slot.dirty)
                    .map(|slot| (slot.data.clone(), slot.version))
            };
            if let Some((data, version)) = snapshot {
                io.store(off, &data)?;
                self.writebacks.fetch_add(1, Ordering::Relaxed);
                self.mark_clean(off, version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder {
        loads: RefCell<Vec<u64>>,
        stores: RefCell<Vec<(u64, u8)>>,
    }
    impl TableIo for Recorder {
        fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
            self.loads.borrow_mut().push(off);
            buf.fill(off as u8);
            Ok(())
        }
        fn store(&self, off: u64, buf: &[u8]) -> Result<()> {
            self.stores.borrow_mut().push((off, buf[0]));
            Ok(())
        }
    }

    #[test]
    fn readers_evict_clean_tables_only_and_writers_write_back_dirty() {
        let io = Recorder::default();
        let c = TableCache::new(16, 32); // two tables
        assert_eq!(c.with(&io, 1, |t| t[0]).unwrap(), 1);
        assert_eq!(c.with(&io, 1, |t| t[0]).unwrap(), 1);
        c.with_mut(&io, 2, |t| t[0] = 42).unwrap();
        assert_eq!(*io.loads.borrow(), vec![1, 2]);
        c.with(&io, 1, |_| ()).unwrap(); // 2 is now least recently used, but dirty
        c.with(&io, 3, |_| ()).unwrap(); // evicts clean 1, no write
        assert!(io.stores.borrow().is_empty());
        c.with_mut(&io, 3, |t| t[0] = 7).unwrap();
        c.with(&io, 5, |_| ()).unwrap(); // everything else dirty: a reader writes nothing
        assert!(io.stores.borrow().is_empty());
        c.insert_new(&io, 6, vec![6; 16].into()).unwrap(); // evicts 5, writes back 2
        assert_eq!(*io.stores.borrow(), vec![(2, 42)]);
        assert_eq!(c.with(&io, 3, |t| t[0]).unwrap(), 7);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.writebacks), (4, 4, 3, 1));
    }

    #[test]
    fn a_table_loaded_into_a_full_dirty_cache_is_not_evicted_at_once() {
        let io = Recorder::default();
        let c = TableCache::new(8, 16); // two tables
        c.with_mut(&io, 1, |t| t[0] = 11).unwrap();
        c.with_mut(&io, 2, |t| t[0] = 12).unwrap();
        assert_eq!(c.with(&io, 3, |t| t[0]).unwrap(), 3);
        c.with_mut(&io, 4, |t| t[0] = 14).unwrap(); // writes 1 back to get under capacity
        assert_eq!(c.with(&io, 4, |t| t[0]).unwrap(), 14);
        assert_eq!(io.loads.borrow().len(), 4);
        assert_eq!(io.stores.borrow()[0], (1, 11));
    }

    #[test]
    fn a_page_taken_by_a_reader_does_not_change_under_it() {
        let io = Recorder::default();
        let c = TableCache::new(8, 64);
        let before = c.get(&io, 9).unwrap();
        c.with_mut(&io, 9, |t| t[0] = 1).unwrap();
        assert_eq!(before[0], 9);
        assert_eq!(c.get(&io, 9).unwrap()[0], 1);
    }

    #[test]
    fn a_load_racing_a_discard_is_not_cached() {
        // The table is dropped while its load runs (as when it is rewritten on disk): the
        // possibly stale bytes are not inserted; the load is retried.
        struct Racing<'a> {
            cache: &'a TableCache,
            loads: RefCell<u8>,
        }
        impl TableIo for Racing<'_> {
            fn load(&self, off: u64, buf: &mut [u8]) -> Result<()> {
                *self.loads.borrow_mut() += 1;
                buf.fill(*self.loads.borrow());
                if *self.loads.borrow() == 1 {
                    self.cache.discard(off);
                }
                Ok(())
            }
            fn store(&self, _: u64, _: &[u8]) -> Result<()> {
                Ok(())
            }
        }
        let c = TableCache::new(8, 64);
        let io = Racing {
            cache: &c,
            loads: RefCell::new(0),
        };
        assert_eq!(c.with(&io, 4, |t| t[0]).unwrap(), 2);
        assert_eq!(c.with(&io, 4, |t| t[0]).unwrap(), 2);
        assert_eq!(*io.loads.borrow(), 2);
    }

    #[test]
    fn flush_writes_dirty_in_offset_order_once() {
        let io = Recorder::default();
        let c = TableCache::new(8, 1024);
        c.insert_new(&io, 300, vec![3; 8].into()).unwrap();
        c.with_mut(&io, 100, |t| t[0] = 1).unwrap();
        c.with(&io, 200, |_| ()).unwrap();
        assert!(c.is_dirty());
        c.flush(&io).unwrap();
        assert_eq!(*io.stores.borrow(), vec![(100, 1), (300, 3)]);
        assert!(!c.is_dirty());
        c.flush(&io).unwrap();
        assert_eq!(io.stores.borrow().len(), 2);
    }

    #[test]
    fn failed_load_leaves_no_entry() {
        struct Failing;
        impl TableIo for Failing {
            fn load(&self, off: u64, _: &mut [u8]) -> Result<()> {
                Err(crate::error::Error::corrupt("bad").at(off))
            }
            fn store(&self, _: u64, _: &[u8]) -> Result<()> {
                Ok(())
            }
        }
        let c = TableCache::new(8, 64);
        assert!(c.with(&Failing, 5, |_| ()).is_err());
        assert!(c.with(&Recorder::default(), 5, |t| t[0]).unwrap() == 5);
    }
}
