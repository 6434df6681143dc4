//! TableCache: an LRU of fixed-size metadata tables (qcow2/qcow L2 tables and refcount blocks,
//! QED tables, VHDX BAT pages) keyed by their host offset, with dirty tracking.
//!
//! The cache never decides write-back order by itself. Writing a dirty table goes through the
//! format's `TableIo::store`, which first makes whatever the table depends on durable (data
//! clusters, refcount blocks, a log entry) — QEMU's "cache dependency" idea. `flush` writes every
//! dirty table through the same path; the format calls flushes of its caches in its safe order.

use crate::error::Result;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

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
    data: Box<[u8]>,
    dirty: bool,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub writebacks: u64,
}

pub struct TableCache {
    slots: Mutex<LruCache<u64, Slot>>,
    table_size: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    writebacks: AtomicU64,
}

impl TableCache {
    /// A cache of tables of `table_size` bytes holding at most `budget_bytes` (at least 2 tables).
    pub fn new(table_size: usize, budget_bytes: u64) -> TableCache {
        let n = (budget_bytes / table_size.max(1) as u64).clamp(2, 1 << 24) as usize;
        TableCache {
            slots: Mutex::new(LruCache::new(NonZeroUsize::new(n).expect("n >= 2"))),
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
        self.lock().cap().get()
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            writebacks: self.writebacks.load(Ordering::Relaxed),
        }
    }

    /// Run `f` on the table at `off`, loading it on a miss.
    pub fn with<R>(&self, io: &dyn TableIo, off: u64, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let mut slots = self.lookup(io, off)?;
        let slot = slots.get(&off).expect("present after lookup");
        Ok(f(&slot.data))
    }

    /// Run `f` on the table at `off` for modification; the table becomes dirty.
    pub fn with_mut<R>(
        &self,
        io: &dyn TableIo,
        off: u64,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Result<R> {
        let mut slots = self.lookup(io, off)?;
        let slot = slots.get_mut(&off).expect("present after lookup");
        slot.dirty = true;
        Ok(f(&mut slot.data))
    }

    /// Put a freshly built table (e.g. a newly allocated, zeroed L2) in the cache as dirty.
    pub fn insert_new(&self, io: &dyn TableIo, off: u64, data: Box<[u8]>) -> Result<()> {
        debug_assert_eq!(data.len(), self.table_size);
        let mut slots = self.lock();
        if !slots.contains(&off) {
            self.make_room(io, &mut slots)?;
        }
        slots.put(off, Slot { data, dirty: true });
        Ok(())
    }

    /// Forget a table without writing it (its cluster was freed).
    pub fn discard(&self, off: u64) {
        self.lock().pop(&off);
    }

    /// Forget every table; dirty ones are lost. Used after a failed open or for re-reads.
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn is_dirty(&self) -> bool {
        self.lock().iter().any(|(_, s)| s.dirty)
    }

    /// Write every dirty table through `io.store` (ascending host offset). Does not sync.
    pub fn flush(&self, io: &dyn TableIo) -> Result<()> {
        let mut slots = self.lock();
        let mut dirty: Vec<u64> = slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            let slot = slots.peek_mut(&off).expect("listed above");
            io.store(off, &slot.data)?;
            slot.dirty = false;
            self.writebacks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, io: &dyn TableIo, off: u64) -> Result<MutexGuard<'_, LruCache<u64, Slot>>> {
        let slots = self.lock();
        if slots.contains(&off) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(slots);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Load without holding the lock, so readers of other tables are not held up by I/O.
        drop(slots);
        let mut data = vec![0u8; self.table_size].into_boxed_slice();
        io.load(off, &mut data)?;
        let mut slots = self.lock();
        if !slots.contains(&off) {
            self.make_room(io, &mut slots)?;
            slots.put(off, Slot { data, dirty: false });
        }
        Ok(slots)
    }

    /// Evict the least recently used table if full, writing it back first when dirty.
    fn make_room(&self, io: &dyn TableIo, slots: &mut LruCache<u64, Slot>) -> Result<()> {
        if slots.len() < slots.cap().get() {
            return Ok(());
        }
        if let Some((&off, slot)) = slots.peek_lru() {
            if slot.dirty {
                io.store(off, &slot.data)?;
                self.writebacks.fetch_add(1, Ordering::Relaxed);
            }
            slots.pop_lru();
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
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
    fn hit_miss_and_lru_eviction_writes_back_dirty() {
        let io = Recorder::default();
        let c = TableCache::new(16, 32); // two tables
        assert_eq!(c.with(&io, 1, |t| t[0]).unwrap(), 1);
        assert_eq!(c.with(&io, 1, |t| t[0]).unwrap(), 1);
        c.with_mut(&io, 2, |t| t[0] = 42).unwrap();
        assert_eq!(*io.loads.borrow(), vec![1, 2]);
        c.with(&io, 1, |_| ()).unwrap(); // 2 is now least recently used
        c.with(&io, 3, |_| ()).unwrap(); // evicts dirty 2 -> written back
        assert_eq!(*io.stores.borrow(), vec![(2, 42)]);
        c.with(&io, 3, |_| ()).unwrap();
        c.with(&io, 4, |_| ()).unwrap(); // evicts clean 1 -> no write
        assert_eq!(io.stores.borrow().len(), 1);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.evictions, s.writebacks), (3, 4, 2, 1));
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
