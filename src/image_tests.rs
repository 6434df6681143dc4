//! Unit tests of the engine against an in-memory block map: the extent walk, backing chains,
//! write allocation, zeroing and SEEK_DATA/SEEK_HOLE, each compared with a byte model.

use super::*;
use crate::host::{FaultFile, SplitMix64};
use parking_lot::Mutex;

const G: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cluster {
    /// At this host offset of the data file.
    Data(u64),
    Zero,
    Backing,
    /// Served by `read_format`: every byte is this value.
    Format(u8),
}

/// A block map of `G`-byte clusters kept in memory; allocation appends to the data file.
struct ModelMap {
    clusters: Mutex<Vec<Cluster>>,
    file: HostFile,
    next_host: Mutex<u64>,
    backing: bool,
}

impl ModelMap {
    fn new(clusters: Vec<Cluster>, file: HostFile, backing: bool) -> ModelMap {
        let next = clusters
            .iter()
            .filter_map(|c| match c {
                Cluster::Data(h) => Some(h + G),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        ModelMap {
            clusters: Mutex::new(clusters),
            file,
            next_host: Mutex::new(next),
            backing,
        }
    }

    /// The run of clusters like the one at `off`, as an extent of at most `len` bytes.
    fn run(&self, off: u64, len: u64) -> Extent {
        let c = self.clusters.lock();
        let first = c[(off / G) as usize];
        let mut end = (off / G + 1) * G;
        while end < off + len {
            let next = c[(end / G) as usize];
            let contiguous = match (first, next) {
                (Cluster::Data(a), Cluster::Data(b)) => b == a + (end - off / G * G),
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            end += G;
        }
        let n = end.min(off + len) - off;
        match first {
            Cluster::Data(h) => Extent::Data {
                host: h + off % G,
                len: n,
            },
            Cluster::Zero => Extent::Zero { len: n },
            Cluster::Backing => Extent::Backing { len: n },
            Cluster::Format(_) => Extent::Format { len: n },
        }
    }
}

impl BlockMap for ModelMap {
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "model",
            virtual_size: self.clusters.lock().len() as u64 * G,
            cluster_size: G,
            backing: self.backing.then(|| BackingRef {
                name: "base".into(),
                format: None,
            }),
            details: Default::default(),
        }
    }

    fn map_read(&self, off: u64, len: u64) -> Result<Extent> {
        Ok(self.run(off, len))
    }

    fn read_format(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = off + done as u64;
            let Cluster::Format(b) = self.clusters.lock()[(pos / G) as usize] else {
                return Err(Error::corrupt("not a format cluster").at(pos));
            };
            let n = ((G - pos % G) as usize).min(buf.len() - done);
            buf[done..done + n].fill(b);
            done += n;
        }
        Ok(())
    }

    fn map_write(&self, off: u64, len: u64, below: &dyn Below) -> Result<Extent> {
        let idx = (off / G) as usize;
        let current = self.clusters.lock()[idx];
        let host = match current {
            Cluster::Data(h) => h,
            old => {
                let host = {
                    let mut next = self.next_host.lock();
                    let h = *next;
                    *next += G;
                    h
                };
                let start = off / G * G;
                let mut fill = vec![0u8; G as usize];
                match old {
                    Cluster::Backing => below.read_below(start, &mut fill)?,
                    Cluster::Format(_) => self.read_format(start, &mut fill)?,
                    _ => {}
                }
                self.file.write_all_at(&fill, host)?;
                self.clusters.lock()[idx] = Cluster::Data(host);
                host
            }
        };
        Ok(Extent::Data {
            host: host + off % G,
            len: (G - off % G).min(len),
        })
    }

    fn write_zeroes(&self, off: u64, len: u64, _unmap: bool, _below: &dyn Below) -> Result<bool> {
        assert!(
            off.is_multiple_of(G) && len.is_multiple_of(G),
            "engine passes whole clusters"
        );
        let mut c = self.clusters.lock();
        for i in off / G..(off + len) / G {
            c[i as usize] = Cluster::Zero;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn mem_file(name: &str, bytes: Vec<u8>) -> HostFile {
    FaultFile::new(bytes).host_file(Path::new(name), true)
}

/// An image over `clusters`, with its data file holding `data`, over `backing`.
fn model_image(
    clusters: Vec<Cluster>,
    data: Vec<u8>,
    backing: Option<Arc<Image>>,
    read_only: bool,
) -> Image {
    let file = mem_file("/model/top", data);
    let map = ModelMap::new(clusters, file.clone(), backing.is_some());
    Image::assemble(
        Path::new("/model/top"),
        file,
        Box::new(map),
        "model",
        backing,
        read_only,
        false,
    )
}

/// The guest bytes `clusters` show, given the data file and the bytes below.
fn expected(clusters: &[Cluster], data: &[u8], below: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; clusters.len() * G as usize];
    for (i, c) in clusters.iter().enumerate() {
        let dst = &mut out[i * G as usize..][..G as usize];
        match *c {
            Cluster::Data(h) => {
                let h = (h as usize).min(data.len());
                let n = (data.len() - h).min(G as usize);
                dst[..n].copy_from_slice(&data[h..h + n]);
            }
            Cluster::Zero => {}
            Cluster::Backing => {
                let s = (i * G as usize).min(below.len());
                let n = (below.len() - s).min(G as usize);
                dst[..n].copy_from_slice(&below[s..s + n]);
            }
            Cluster::Format(b) => dst.fill(b),
        }
    }
    out
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SplitMix64::new(seed).fill(&mut v);
    v
}

/// A 16-cluster base image (all data) and a 24-cluster top over it mixing every extent kind,
/// with backing clusters past the base's end.
fn chain() -> (Image, Vec<u8>) {
    use Cluster::*;
    let base_data = random(1, 16 * G as usize);
    let base = model_image(
        (0..16).map(|i| Data(i * G)).collect(),
        base_data.clone(),
        None,
        true,
    );
    let top_clusters = vec![
        Data(0),
        Data(G),
        Zero,
        Backing,
        Backing,
        Format(7),
        Data(3 * G),
        Data(2 * G),
        Zero,
        Zero,
        Backing,
        Format(9),
        Backing,
        Data(4 * G),
        Zero,
        Backing,
        Backing, // 16..: past the base's end, reads zeros
        Backing,
        Data(5 * G),
        Zero,
        Backing,
        Format(1),
        Backing,
        Data(6 * G),
    ];
    // The last data cluster lies past the file's end: reads as zeros (allocated, not written).
    let top_data = random(2, 6 * G as usize + 100);
    let want = expected(&top_clusters, &top_data, &base_data);
    let top = model_image(top_clusters, top_data, Some(Arc::new(base)), false);
    (top, want)
}

#[test]
fn reads_walk_every_extent_kind_at_any_offset_and_length() {
    let (img, want) = chain();
    let mut rng = SplitMix64::new(3);
    let mut whole = vec![0xa5u8; want.len()];
    img.read_at(&mut whole, 0).unwrap();
    assert!(whole == want, "whole-disk read differs");
    for _ in 0..500 {
        let off = rng.below(want.len() as u64);
        let len = 1 + rng.below((want.len() as u64 - off).min(5 * G)) as usize;
        let mut buf = vec![0xa5u8; len];
        img.read_at(&mut buf, off).unwrap();
        assert!(buf == want[off as usize..][..len], "read {off:#x}+{len:#x}");
    }
    let mut past = [0u8; 2];
    assert!(img.read_at(&mut past, want.len() as u64 - 1).is_err());
}

#[test]
fn writes_allocate_with_copy_on_write_and_read_back() {
    let (img, mut want) = chain();
    let mut rng = SplitMix64::new(4);
    for i in 0..300 {
        let off = rng.below(want.len() as u64);
        let len = 1 + rng.below((want.len() as u64 - off).min(3 * G)) as usize;
        let data = random(100 + i, len);
        img.write_at(&data, off).unwrap();
        want[off as usize..][..len].copy_from_slice(&data);
    }
    let mut got = vec![0xa5u8; want.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == want, "after writes");
    // The backing image is never written.
    let base = img.backing().unwrap();
    let mut b = vec![0u8; base.size() as usize];
    base.read_at(&mut b, 0).unwrap();
    assert!(b == random(1, 16 * G as usize));
}

#[test]
fn zeroing_unaligned_ranges_zeroes_exactly_them() {
    let (img, mut want) = chain();
    for (off, len) in [
        (100, 50),
        (G - 10, 20),
        (3 * G + 5, 4 * G),
        (10 * G, 2 * G),
        (15 * G + 1, 3 * G),
        (0, G),
    ] {
        img.write_zeroes(off, len, true).unwrap();
        want[off as usize..(off + len) as usize].fill(0);
        let mut got = vec![0xa5u8; want.len()];
        img.read_at(&mut got, 0).unwrap();
        assert!(got == want, "after zeroing {off:#x}+{len:#x}");
    }
}

#[test]
fn zeroing_what_already_reads_as_zeros_allocates_nothing() {
    use Cluster::*;
    let base = model_image(vec![Zero; 4], Vec::new(), None, true);
    let img = model_image(
        vec![Zero, Backing, Backing, Zero, Backing, Backing],
        Vec::new(),
        Some(Arc::new(base)),
        false,
    );
    // Partial clusters become zero *bytes* through the engine, but these all read as zeros
    // already (zero clusters, zeros below, past the backing end): no cluster is allocated.
    for (off, len) in [(10, 100), (G + 7, 2 * G), (4 * G + 3, 2 * G - 6)] {
        img.write_zeroes(off, len, false).unwrap();
    }
    assert_eq!(img.host_len(), 0, "a zeroing write allocated a cluster");
}

#[test]
fn seek_data_and_hole_agree_with_the_chain() {
    use Cluster::*;
    // Base: data in clusters 1, 5 and 7 (its last); zero elsewhere.
    let base = model_image(
        vec![Zero, Data(0), Zero, Zero, Zero, Data(G), Zero, Data(2 * G)],
        random(5, 3 * G as usize),
        None,
        true,
    );
    let img = model_image(
        vec![
            Backing,
            Backing,
            Zero,
            Data(0),
            Backing,
            Backing,
            Zero,
            Backing,
            Backing,
            Backing,
        ],
        random(6, G as usize),
        Some(Arc::new(base)),
        false,
    );
    // Data: clusters 1, 5 and 7 (from below), 3 (own); 8.. is past the base's end, and the
    // backing run 7..10 crosses it.
    let data = [1u64, 3, 5, 7];
    let is_data = |c: u64| data.contains(&c);
    for off in (0..10 * G).step_by(512) {
        let c = off / G;
        let next_data = (c..10).find(|&c| is_data(c)).map(|d| (d * G).max(off));
        assert_eq!(img.seek_data(off).unwrap(), next_data, "SEEK_DATA {off:#x}");
        let next_hole = (c..10)
            .find(|&c| !is_data(c))
            .map_or(10 * G, |h| (h * G).max(off));
        assert_eq!(img.seek_hole(off).unwrap(), next_hole, "SEEK_HOLE {off:#x}");
    }
}

#[test]
fn read_only_images_refuse_writes_and_zeroing() {
    let img = model_image(vec![Cluster::Zero; 2], Vec::new(), None, true);
    assert_eq!(
        img.write_at(&[1], 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert_eq!(
        img.write_zeroes(0, G, true).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
}
