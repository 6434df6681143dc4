//! L2 entries with their fields named, so the bit layout lives in one place.
//!
//! ```text
//!   L1 entry: 63 copied | 55..9 L2 table offset
//!   L2 entry: 63 copied | 62 compressed | 55..9 host cluster | 0 zero (v3, not extended)
//!             (compressed: a descriptor below bit 62, see compressed.rs)
//!   extended L2: [entry u64][bitmap u64: 31..0 allocated, 63..32 reads-as-zero per subcluster]
//! ```

use super::compressed::CompressedRef;

pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const SUBCLUSTERS: u64 = 32;

/// One L2 entry (the first u64 of an extended entry) as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// No host cluster, no flags: the backing file (or zeros) shows through.
    pub const UNALLOCATED: L2Entry = L2Entry(0);
    /// Reads as zeros, no host cluster (the v3 zero flag alone).
    pub const ZERO: L2Entry = L2Entry(OFLAG_ZERO);

    /// A standard cluster at `host` that this image alone references (COPIED: refcount 1).
    pub fn owned(host: u64) -> L2Entry {
        L2Entry(host | OFLAG_COPIED)
    }
    /// The same entry with the zero flag set.
    pub fn with_zero_flag(self) -> L2Entry {
        L2Entry(self.0 | OFLAG_ZERO)
    }

    pub fn compressed(self) -> bool {
        self.0 & OFLAG_COMPRESSED != 0
    }
    pub fn copied(self) -> bool {
        self.0 & OFLAG_COPIED != 0
    }
    /// Bit 0: reads as zeros (meaningful in v3 images without extended L2 entries).
    pub fn zero_flag(self) -> bool {
        self.0 & OFLAG_ZERO != 0
    }
    /// The host cluster offset of a standard (not compressed) entry; 0 when none.
    pub fn host(self) -> u64 {
        self.0 & L2E_OFFSET_MASK
    }
    /// Does a standard entry have a host cluster? With an external data file, offset 0 is a
    /// valid one (marked by COPIED).
    pub fn has_host(self, external: bool) -> bool {
        self.host() != 0 || (external && self.copied())
    }
    /// Where a compressed entry's bytes lie.
    pub fn compressed_ref(self, cluster_bits: u32) -> CompressedRef {
        CompressedRef::decode(self.0, cluster_bits)
    }
}

/// State of one subcluster of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sc {
    Allocated,
    Zero,
    Unallocated,
}

/// The subcluster bitmap of an extended L2 entry: bit n allocated, bit 32 + n reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Subclusters(pub u64);

impl Subclusters {
    /// No bitmap (standard L2 entries), or nothing allocated nor zero.
    pub const NONE: Subclusters = Subclusters(0);
    pub const ALL_ALLOCATED: Subclusters = Subclusters(0xffff_ffff);
    pub const ALL_ZERO: Subclusters = Subclusters(0xffff_ffff << 32);

    /// Bitmap of a freshly written whole cluster: all allocated with extended entries, none
    /// (no bitmap) without.
    pub fn full(ext_l2: bool) -> Subclusters {
        if ext_l2 {
            Subclusters::ALL_ALLOCATED
        } else {
            Subclusters::NONE
        }
    }

    pub fn state(self, sc: u64) -> Sc {
        if self.0 >> sc & 1 != 0 {
            Sc::Allocated
        } else if self.0 >> (32 + sc) & 1 != 0 {
            Sc::Zero
        } else {
            Sc::Unallocated
        }
    }
    /// Some subcluster marked both allocated and zero (invalid).
    pub fn conflicting(self) -> bool {
        self.0 & (self.0 >> 32) & 0xffff_ffff != 0
    }
    pub fn all_allocated(self) -> bool {
        self.0 & 0xffff_ffff == 0xffff_ffff
    }
    /// The allocation bits of subclusters `s0..=s1`.
    fn span(s0: u64, s1: u64) -> u64 {
        ((1u64 << (s1 + 1)) - 1) & !((1u64 << s0) - 1)
    }
    /// Are subclusters `s0..=s1` all allocated?
    pub fn allocated(self, s0: u64, s1: u64) -> bool {
        let t = Self::span(s0, s1);
        self.0 & t == t
    }
    /// This bitmap with subclusters `s0..=s1` allocated (and no longer zero).
    pub fn allocate(self, s0: u64, s1: u64) -> Subclusters {
        let t = Self::span(s0, s1);
        Subclusters((self.0 | t) & !(t << 32))
    }
}

/// Read an L2 entry (and its subcluster bitmap) from a table buffer.
pub fn entry_at(t: &[u8], idx: u64, ext: bool) -> (L2Entry, Subclusters) {
    let i = idx as usize * if ext { 16 } else { 8 };
    let e = crate::formats::be64(t, i);
    let b = if ext {
        crate::formats::be64(t, i + 8)
    } else {
        0
    };
    (L2Entry(e), Subclusters(b))
}

pub fn set_entry_at(t: &mut [u8], idx: u64, ext: bool, e: L2Entry, b: Subclusters) {
    let i = idx as usize * if ext { 16 } else { 8 };
    t[i..i + 8].copy_from_slice(&e.0.to_be_bytes());
    if ext {
        t[i + 8..i + 16].copy_from_slice(&b.0.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_subclusters() {
        let e = L2Entry::owned(0x1_0000);
        assert_eq!(e.0, 0x8000_0000_0001_0000);
        assert!(e.copied() && !e.compressed() && !e.zero_flag());
        assert_eq!(e.host(), 0x1_0000);
        assert!(!L2Entry::UNALLOCATED.has_host(false));
        assert!(L2Entry(OFLAG_COPIED).has_host(true));
        assert_eq!(e.with_zero_flag().0 & 1, 1);
        let b = Subclusters(0b101 | (0b010 << 32));
        assert_eq!(b.state(0), Sc::Allocated);
        assert_eq!(b.state(1), Sc::Zero);
        assert_eq!(b.state(3), Sc::Unallocated);
        assert!(!b.conflicting() && Subclusters(1 | 1 << 32).conflicting());
        assert!(b.allocated(2, 2) && !b.allocated(0, 2));
        assert_eq!(b.allocate(1, 3), Subclusters(0b1111));
        assert!(Subclusters::ALL_ALLOCATED.all_allocated());
        let mut t = vec![0u8; 32];
        set_entry_at(&mut t, 1, true, e, b);
        assert_eq!(entry_at(&t, 1, true), (e, b));
    }
}
