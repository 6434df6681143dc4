//! The in-memory model of the disk.
//!
//! `Chunks` holds the expected bytes split into the ownership chunks of one epoch, each under its own
//! lock: a writer holds its chunk's write lock while it changes the disk and the model, a reader
//! holds read locks on every chunk its read covers, so every read has one right answer.
//!
//! `Durable` (crash mode) keeps, per byte, the set of values it may hold after a kill: the value
//! as of the last fsync that covered it (`base`) plus every value written since (`pending`,
//! including writes still in flight, which may have landed in part).

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use std::sync::Arc;

pub struct Chunks {
    pub size: u64,
    pub chunk: u64,
    parts: Vec<RwLock<Vec<u8>>>,
}

impl Chunks {
    pub fn new(bytes: Vec<u8>, chunk: u64) -> Chunks {
        let size = bytes.len() as u64;
        let parts = bytes
            .chunks(chunk as usize)
            .map(|c| RwLock::new(c.to_vec()))
            .collect();
        Chunks { size, chunk, parts }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.size as usize);
        for p in self.parts {
            v.extend_from_slice(&p.into_inner());
        }
        v
    }

    pub fn count(&self) -> u64 {
        self.parts.len() as u64
    }

    pub fn range_of(&self, idx: u64) -> (u64, u64) {
        let s = idx * self.chunk;
        (s, (s + self.chunk).min(self.size))
    }

    pub fn lock(&self, idx: u64) -> parking_lot::RwLockWriteGuard<'_, Vec<u8>> {
        self.parts[idx as usize].write()
    }

    /// Read locks on every chunk covering `off..off+len`, in ascending order (writers hold one lock
    /// at a time, so this cannot deadlock).
    pub fn read(&self, off: u64, len: u64) -> ReadView<'_> {
        let first = off / self.chunk;
        let last = (off + len.max(1) - 1) / self.chunk;
        let guards = (first..=last)
            .map(|i| self.parts[i as usize].read())
            .collect();
        ReadView {
            chunk: self.chunk,
            first,
            guards,
        }
    }
}

pub struct ReadView<'a> {
    chunk: u64,
    first: u64,
    guards: Vec<RwLockReadGuard<'a, Vec<u8>>>,
}

impl ReadView<'_> {
    /// The expected bytes of `off..off+len` (inside the locked chunks).
    pub fn bytes(&self, off: u64, len: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len as usize);
        let mut pos = off;
        while pos < off + len {
            let i = pos / self.chunk;
            let g = &self.guards[(i - self.first) as usize];
            let s = (pos - i * self.chunk) as usize;
            let n = ((off + len - pos) as usize).min(g.len() - s);
            v.extend_from_slice(&g[s..s + n]);
            pos += n as u64;
        }
        v
    }
}

#[derive(Clone)]
pub enum Data {
    Bytes(Arc<Vec<u8>>),
    Zeros(u64),
}

impl Data {
    pub fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::Zeros(n) => *n,
        }
    }
    fn at(&self, i: u64) -> u8 {
        match self {
            Data::Bytes(b) => b[i as usize],
            Data::Zeros(_) => 0,
        }
    }
}

struct Pending {
    id: u64,
    off: u64,
    data: Data,
    /// Clock value when the write returned; u64::MAX while in flight.
    done: u64,
}

pub struct Durable {
    inner: Mutex<DurableInner>,
}

struct DurableInner {
    base: Vec<u8>,
    pending: Vec<Pending>,
    clock: u64,
    next_id: u64,
}

impl Durable {
    pub fn new(base: Vec<u8>) -> Durable {
        Durable {
            inner: Mutex::new(DurableInner {
                base,
                pending: Vec::new(),
                clock: 0,
                next_id: 0,
            }),
        }
    }

    /// Record a write before it is issued; returns its id for `complete`.
    pub fn begin(&self, off: u64, data: Data) -> u64 {
        let mut g = self.inner.lock();
        let id = g.next_id;
        g.next_id += 1;
        g.pending.push(Pending {
            id,
            off,
            data,
            done: u64::MAX,
        });
        id
    }

    pub fn complete(&self, id: u64) {
        let mut g = self.inner.lock();
        g.clock += 1;
        let now = g.clock;
        if let Some(p) = g.pending.iter_mut().find(|p| p.id == id) {
            p.done = now;
        }
    }

    /// Call before fsync; pass the result to `synced` when the fsync succeeded.
    pub fn sync_start(&self) -> u64 {
        let mut g = self.inner.lock();
        g.clock += 1;
        g.clock
    }

    /// Everything that completed before `start` is durable now.
    pub fn synced(&self, start: u64) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let mut done: Vec<Pending> = Vec::new();
        let mut keep = Vec::new();
        for p in g.pending.drain(..) {
            if p.done < start {
                done.push(p);
            } else {
                keep.push(p);
            }
        }
        g.pending = keep;
        done.sort_by_key(|p| p.done);
        for p in done {
            let s = p.off as usize;
            match &p.data {
                Data::Bytes(b) => g.base[s..s + b.len()].copy_from_slice(b),
                Data::Zeros(n) => g.base[s..s + *n as usize].fill(0),
            }
        }
    }

    /// Check what a remount after a kill reads: every byte is its durable value or one written
    /// since. Returns a description of the first violation.
    pub fn verify(&self, got: &[u8]) -> Result<(), (u64, String)> {
        let g = self.inner.lock();
        for (i, (&v, &b)) in got.iter().zip(g.base.iter()).enumerate() {
            if v == b {
                continue;
            }
            let i = i as u64;
            let allowed = g
                .pending
                .iter()
                .any(|p| p.off <= i && i < p.off + p.data.len() && p.data.at(i - p.off) == v);
            if !allowed {
                let writes: Vec<String> = g
                    .pending
                    .iter()
                    .filter(|p| p.off <= i && i < p.off + p.data.len())
                    .map(|p| format!("{:#x}+{:#x}", p.off, p.data.len()))
                    .collect();
                return Err((
                    i,
                    format!(
                        "byte {i:#x} reads {v:#04x}: the last fsync'd value is {b:#04x} and no write since (covering it: [{}]) wrote {v:#04x}",
                        writes.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// After a verified remount: what was read is the new durable state.
    pub fn reset(&self, now: Vec<u8>) {
        let mut g = self.inner.lock();
        g.base = now;
        g.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_model_allows_synced_and_pending_values_only() {
        let d = Durable::new(vec![1u8; 16]);
        // A write that completed before the fsync started becomes the base...
        let a = d.begin(0, Data::Bytes(Arc::new(vec![2u8; 4])));
        d.complete(a);
        let s = d.sync_start();
        // ...one that completed after it stays pending, as does one still in flight.
        let b = d.begin(4, Data::Bytes(Arc::new(vec![3u8; 4])));
        d.complete(b);
        d.synced(s);
        d.begin(8, Data::Zeros(4));
        let mut got = vec![1u8; 16];
        got[..4].fill(2);
        assert!(d.verify(&got).is_ok());
        got[4] = 3; // landed
        got[9] = 0; // in-flight zeroing landed in part
        assert!(d.verify(&got).is_ok());
        // The fsync'd write lost: not allowed.
        got[0] = 1;
        assert_eq!(d.verify(&got).unwrap_err().0, 0);
        got[0] = 2;
        // A value nobody wrote: not allowed.
        got[13] = 7;
        assert_eq!(d.verify(&got).unwrap_err().0, 13);
    }

    #[test]
    fn chunks_round_trip_and_read_across_chunks() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let c = Chunks::new(bytes.clone(), 16);
        assert_eq!(c.count(), 7);
        assert_eq!(c.range_of(6), (96, 100));
        assert_eq!(c.read(10, 30).bytes(10, 30), bytes[10..40].to_vec());
        c.lock(1)[0] = 0xff;
        assert_eq!(c.read(15, 2).bytes(15, 2), vec![15, 0xff]);
        let mut want = bytes;
        want[16] = 0xff;
        assert_eq!(c.into_bytes(), want);
    }
}
