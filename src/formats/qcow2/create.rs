//! Make a new empty qcow2 image.
//!
//! ```text
//!   cluster 0            header, extensions (backing format, feature names), backing name
//!   clusters 1..         refcount table | refcount blocks | L1 table
//! ```

use super::header::{
    Header, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_FEATURE_NAMES, INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2, MAGIC, MAX_L1_BYTES,
};
use super::refcount::block_set;
use super::Qcow2Map;
use crate::error::{Error, Result};
use crate::format::{CreateOpts, OpenCtx, DEFAULT_CACHE_SIZE};
use crate::host::HostFile;

struct Opts {
    cluster_bits: u32,
    version: u32,
    lazy: bool,
    refcount_order: u32,
    ext_l2: bool,
    prealloc_metadata: bool,
    zstd: bool,
}

fn parse_size(v: &str) -> Option<u64> {
    crate::options::parse_size(v).ok()
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    crate::options::opt_bool("qcow2", k, v)
}

fn parse_opts(o: &CreateOpts) -> Result<Opts> {
    let mut r = Opts {
        cluster_bits: 16,
        version: 3,
        lazy: false,
        refcount_order: 4,
        ext_l2: false,
        prealloc_metadata: false,
        zstd: false,
    };
    for (k, v) in &o.options {
        match k.as_str() {
            "cluster_size" => {
                let cs = parse_size(v)
                    .filter(|c| c.is_power_of_two() && (512..=2 << 20).contains(c))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "qcow2: cluster_size={v}: must be a power of two in 512..2M"
                        ))
                    })?;
                r.cluster_bits = cs.trailing_zeros();
            }
            "compat" => {
                r.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(Error::invalid(format!("qcow2: compat={v}: 0.10 or 1.1"))),
                }
            }
            "lazy_refcounts" => r.lazy = parse_bool(k, v)?,
            "extended_l2" => r.ext_l2 = parse_bool(k, v)?,
            "refcount_bits" => {
                let bits: u32 = v
                    .parse()
                    .ok()
                    .filter(|b: &u32| b.is_power_of_two() && *b <= 64)
                    .ok_or_else(|| {
                        Error::invalid(format!("qcow2: refcount_bits={v}: 1, 2, 4 ... 64"))
                    })?;
                r.refcount_order = bits.trailing_zeros();
            }
            "preallocation" => {
                r.prealloc_metadata = match v.as_str() {
                    "off" => false,
                    "metadata" => true,
                    _ => {
                        return Err(Error::invalid(format!(
                            "qcow2: preallocation={v} not supported (off, metadata)"
                        )))
                    }
                }
            }
            "compression_type" => {
                r.zstd = match v.as_str() {
                    "zlib" => false,
                    "zstd" => true,
                    _ => return Err(Error::invalid(format!("qcow2: compression_type={v}"))),
                }
            }
            _ => return Err(Error::invalid(format!("qcow2: unknown option {k:?}"))),
        }
    }
    if r.version == 2 && (r.lazy || r.refcount_order != 4 || r.ext_l2 || r.zstd) {
        return Err(Error::invalid(
            "qcow2: lazy_refcounts, refcount_bits other than 16, extended_l2 and zstd need compat=1.1",
        ));
    }
    if r.ext_l2 && r.cluster_bits < 14 {
        return Err(Error::invalid(
            "qcow2: extended_l2 needs cluster_size of at least 16K",
        ));
    }
    Ok(r)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Header extensions: backing format, feature names (when they fit), end.
fn extensions(o: &Opts, backing_fmt: Option<&str>, room: usize) -> Vec<u8> {
    let mut x = Vec::new();
    if let Some(f) = backing_fmt {
        x.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        x.extend_from_slice(&(f.len() as u32).to_be_bytes());
        x.extend_from_slice(f.as_bytes());
        x.resize(x.len().div_ceil(8) * 8, 0);
    }
    let names = FEATURES.len() * 48;
    if o.version == 3 && x.len() + 8 + names + 8 <= room {
        x.extend_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        x.extend_from_slice(&(names as u32).to_be_bytes());
        for (t, bit, name) in FEATURES {
            let mut e = [0u8; 48];
            e[0] = *t;
            e[1] = *bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            x.extend_from_slice(&e);
        }
    }
    x.extend_from_slice(&[0u8; 8]);
    x
}

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    let o = parse_opts(opts)?;
    let size = match (&opts.backing_info, opts.size) {
        (Some(b), 0) => b.virtual_size,
        (_, s) => s,
    };
    let cs = 1u64 << o.cluster_bits;
    let l2_entries = cs / if o.ext_l2 { 16 } else { 8 };
    let l1_entries = Header::l1_entries_for(size, o.cluster_bits, l2_entries);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "qcow2: virtual size {size} is too large for {cs}-byte clusters"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let epb = (cs * 8) >> o.refcount_order;
    let (mut rt_c, mut rb_c) = (1u64, 1u64);
    loop {
        let total = 1 + rt_c + rb_c + l1_clusters;
        let rb = total.div_ceil(epb);
        let rt = (rb * 8).div_ceil(cs);
        if (rb, rt) == (rb_c, rt_c) {
            break;
        }
        (rb_c, rt_c) = (rb.max(rb_c), rt.max(rt_c));
    }
    let total = 1 + rt_c + rb_c + l1_clusters;
    let rt_off = cs;
    let rb_off = rt_off + rt_c * cs;
    let l1_off = rb_off + rb_c * cs;

    // Cluster 0: header.
    let hlen = if o.version == 3 { 112 } else { 72 };
    let mut h = vec![0u8; cs as usize];
    h[0..4].copy_from_slice(MAGIC);
    put32(&mut h, 4, o.version);
    put32(&mut h, 20, o.cluster_bits);
    put64(&mut h, 24, size);
    put32(&mut h, 36, l1_entries as u32);
    put64(&mut h, 40, l1_off);
    put64(&mut h, 48, rt_off);
    put32(&mut h, 56, rt_c as u32);
    if o.version == 3 {
        let mut incompat = 0;
        if o.ext_l2 {
            incompat |= INCOMPAT_EXTL2;
        }
        if o.zstd {
            incompat |= INCOMPAT_COMPRESSION;
            h[104] = 1;
        }
        put64(&mut h, 72, incompat);
        put64(&mut h, 80, if o.lazy { COMPAT_LAZY_REFCOUNTS } else { 0 });
        put32(&mut h, 96, o.refcount_order);
        put32(&mut h, 100, hlen as u32);
    }
    let backing = opts.backing.as_ref();
    let name_len = backing.map_or(0, |b| b.name.len());
    if name_len > 1023 {
        return Err(Error::invalid(
            "qcow2: backing file name longer than 1023 bytes",
        ));
    }
    let room = (cs as usize).saturating_sub(hlen + name_len);
    let ext = extensions(&o, backing.and_then(|b| b.format.as_deref()), room);
    if hlen + ext.len() + name_len > cs as usize {
        return Err(Error::invalid(
            "qcow2: backing file name does not fit in the header cluster",
        ));
    }
    h[hlen..hlen + ext.len()].copy_from_slice(&ext);
    if let Some(b) = backing {
        let at = hlen + ext.len();
        h[at..at + name_len].copy_from_slice(b.name.as_bytes());
        put64(&mut h, 8, at as u64);
        put32(&mut h, 16, name_len as u32);
    }

    // Refcount table and blocks: clusters 0..total have refcount 1.
    let mut rt = vec![0u8; (rt_c * cs) as usize];
    let mut rb = vec![0u8; (rb_c * cs) as usize];
    for i in 0..rb_c {
        put64(&mut rt, (i * 8) as usize, rb_off + i * cs);
    }
    for c in 0..total {
        let block = (c / epb) as usize;
        let i = (c % epb) as usize;
        let b = &mut rb[block * cs as usize..(block + 1) * cs as usize];
        block_set(b, i, o.refcount_order, 1);
    }
    file.write_all_at(&h, 0)?;
    file.write_all_at(&rt, rt_off)?;
    file.write_all_at(&rb, rb_off)?;
    file.set_len(total * cs)?;
    file.sync()?;

    if o.prealloc_metadata {
        let no_sibling = |name: &str| -> Result<HostFile> {
            Err(Error::invalid(format!(
                "qcow2: unexpected file {name:?} while creating"
            )))
        };
        let ctx = OpenCtx {
            read_only: false,
            cache_size: DEFAULT_CACHE_SIZE,
            open_sibling: &no_sibling,
        };
        let map = Qcow2Map::open(file.clone(), &ctx)?;
        super::write::preallocate(&map)?;
        crate::format::BlockMap::close(&map)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FaultFile;
    use std::path::Path;

    #[test]
    fn created_images_parse() {
        for (cs, compat, bits, ext) in [
            ("512", "1.1", "1", "off"),
            ("65536", "0.10", "16", "off"),
            ("2M", "1.1", "64", "on"),
            ("16k", "1.1", "8", "on"),
        ] {
            let f = FaultFile::new(Vec::new());
            let hf = f.host_file(Path::new("mem.qcow2"), true);
            let mut o = CreateOpts {
                size: 100 << 20,
                ..CreateOpts::default()
            };
            for (k, v) in [
                ("cluster_size", cs),
                ("compat", compat),
                ("refcount_bits", bits),
                ("extended_l2", ext),
            ] {
                if compat == "0.10" && k != "cluster_size" && k != "compat" {
                    continue;
                }
                o.options.insert(k.into(), v.into());
            }
            create(&hf, &o).unwrap();
            let h = super::super::read_header(&hf).unwrap();
            assert_eq!(h.size, 100 << 20);
            assert_eq!(h.cluster_size(), parse_size(cs).unwrap());
        }
    }

    #[test]
    fn bad_options_refused() {
        let f = FaultFile::new(Vec::new());
        let hf = f.host_file(Path::new("mem.qcow2"), true);
        for (k, v) in [
            ("cluster_size", "1000"),
            ("compat", "2.0"),
            ("refcount_bits", "3"),
            ("bogus", "1"),
            ("preallocation", "full"),
        ] {
            let mut o = CreateOpts {
                size: 1 << 20,
                ..CreateOpts::default()
            };
            o.options.insert(k.into(), v.into());
            assert!(create(&hf, &o).is_err(), "{k}={v}");
        }
    }
}
