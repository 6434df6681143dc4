//! imgfs-stress: seeded random I/O on the exposed file of a mounted image, every read checked
//! against an in-memory model of the disk (in the spirit of xfstests' fsx and fsstress).
//!
//! ```text
//! imgfs-stress [--formats raw,qcow2-chain,...] [--ops N] [--seed S] [--writers W] [--readers R]
//!              [--crash ROUNDS] [--fs] [--keep] [--dir DIR] [--imgfs PATH] [--list]
//! ```
//!
//! A run builds the case's image (cases.rs), takes its guest content from `qemu-img convert` as the
//! model, mounts it with `imgfs mount` and runs epochs of operations. In each epoch the disk is cut
//! into chunks of one size (from a quarter cluster up to 8 MiB) dealt round-robin to the writer
//! threads, so writers work on disjoint ranges, sometimes disjoint pieces of one cluster; readers
//! read anywhere. Between epochs: full read-back, close/reopen, unmount + `imgfs check` + remount,
//! and in crash mode kill -9 of the daemon at a random operation. At the end `imgfs check`,
//! `qemu-img check` (where QEMU checks the format) and `qemu-img convert -O raw` must agree with the
//! model. The first mismatch prints the seed, the operation number, the offset and a hex diff, and
//! the exit status is 1.
//!
//! `--fs` runs the filesystem-level workload instead (fsrun.rs).

mod cases;
mod fsrun;
mod model;

use imgfs::host::SplitMix64;
use model::{Chunks, Data, Durable};
use parking_lot::Mutex;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Virtual size of every case: not a multiple of any cluster size above 4 KiB.
pub const SIZE: u64 = (48 << 20) + 3 * 4096;
/// Backing image size for chain cases: inside a cluster, not sector-aligned to 4 KiB.
pub const BSIZE: u64 = (40 << 20) + 1536;
const PAGE: u64 = 4096;

pub struct Args {
    pub formats: Vec<String>,
    pub ops: u64,
    pub seed: u64,
    pub writers: u64,
    pub readers: u64,
    pub crash: u64,
    pub fs: bool,
    pub keep: bool,
    pub dir: PathBuf,
    pub imgfs: PathBuf,
}

fn usage() -> ! {
    eprintln!(
        "usage: imgfs-stress [--formats a,b,...] [--ops N] [--seed S] [--writers W] [--readers R] \
         [--crash ROUNDS] [--fs] [--keep] [--dir DIR] [--imgfs PATH] [--list]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut a = Args {
        formats: Vec::new(),
        ops: 5000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        writers: 3,
        readers: 2,
        crash: 0,
        fs: false,
        keep: false,
        dir: std::env::temp_dir(),
        imgfs: std::env::var_os("IMGFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe_dir.join("imgfs")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |s: String| -> u64 {
            let t = s.trim();
            let r = match t.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => t.parse(),
            };
            r.unwrap_or_else(|_| usage())
        };
        match flag.as_str() {
            "--formats" => a.formats = val().split(',').map(str::to_string).collect(),
            "--ops" => a.ops = num(val()),
            "--seed" => a.seed = num(val()),
            "--writers" => a.writers = num(val()).max(1),
            "--readers" => a.readers = num(val()),
            "--crash" => a.crash = num(val()),
            "--dir" => a.dir = PathBuf::from(val()),
            "--imgfs" => a.imgfs = PathBuf::from(val()),
            "--fs" => a.fs = true,
            "--keep" => a.keep = true,
            "--list" => {
                for c in cases::CASES {
                    println!(
                        "{:<12} {:<6} cluster {:>8}  backing {:<5} qemu-img check {}",
                        c.name, c.fmt, c.cluster, c.backing, c.qemu_check
                    );
                }
                std::process::exit(0)
            }
            _ => usage(),
        }
    }
    if a.formats.is_empty() {
        a.formats = cases::CASES.iter().map(|c| c.name.to_string()).collect();
    }
    a
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--fs-worker") {
        fsrun::worker(&argv[2..]);
    }
    let args = parse_args();
    let mut failed = false;
    for name in &args.formats {
        let Some(case) = cases::find(name) else {
            eprintln!("imgfs-stress: unknown format case {name:?} (see --list)");
            std::process::exit(2);
        };
        let seed = args.seed;
        let t = Instant::now();
        let r = if args.fs {
            fsrun::run(case, &args, seed)
        } else {
            run_case(case, &args, seed)
        };
        match r {
            Ok(summary) => println!(
                "{name}: seed {seed:#x}: OK in {:.1} s: {summary}",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!("{name}: seed {seed:#x}: FAILED: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}

// ---------------------------------------------------------------------------------------------
// Shell helpers

pub fn sh(cmd: &str, args: &[&str]) -> Result<(i32, String), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

pub fn sh_ok(cmd: &str, args: &[&str]) -> Result<String, String> {
    let (code, out) = sh(cmd, args)?;
    if code != 0 {
        return Err(format!(
            "{cmd} {} exited {code}: {}",
            args.join(" "),
            out.trim()
        ));
    }
    Ok(out)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

/// A scratch directory, removed at the end unless the run failed or `--keep`.
pub struct Scratch {
    pub path: PathBuf,
    pub keep: bool,
}

impl Scratch {
    pub fn new(args: &Args, what: &str, seed: u64) -> Result<Scratch, String> {
        let path = args.dir.join(format!(
            "imgfs-stress-{what}-{seed:x}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(path.join("mnt"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Scratch {
            path,
            keep: args.keep,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mnt = self.path.join("mnt");
        if is_mounted(&mnt) {
            let _ = sh("umount", &["-l", s(&mnt)]);
        }
        if self.keep || std::thread::panicking() {
            eprintln!("imgfs-stress: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn is_mounted(dir: &Path) -> bool {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_str()))
}

/// `imgfs mount IMG MNT`; returns the daemon's pid.
pub fn mount(imgfs: &Path, img: &Path, mnt: &Path, extra: &[&str]) -> Result<i32, String> {
    let mut a = vec!["mount"];
    a.extend_from_slice(extra);
    a.extend_from_slice(&[s(img), s(mnt)]);
    sh_ok(s(imgfs), &a)?;
    let path = std::ffi::CString::new(s(mnt)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 32];
    // SAFETY: getxattr(2) into a buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.imgfs.pid".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let v = String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned();
    v.trim()
        .parse()
        .map_err(|_| format!("daemon pid {v:?} on {}", mnt.display()))
}

pub fn umount(imgfs: &Path, mnt: &Path) -> Result<(), String> {
    sh_ok(s(imgfs), &["umount", s(mnt)]).map(|_| ())
}

/// `imgfs check`: 0 clean, 63 cannot check; 3 (leaks only) when `leaks_ok`.
pub fn imgfs_check(imgfs: &Path, fmt: &str, img: &Path, leaks_ok: bool) -> Result<(), String> {
    let (code, out) = sh(s(imgfs), &["check", "-f", fmt, s(img)])?;
    if code == 0 || code == 63 || (leaks_ok && code == 3) {
        Ok(())
    } else {
        Err(format!("imgfs check exited {code}: {}", out.trim()))
    }
}

/// `qemu-img check`: 0 clean; 3 (leaks only) when `leaks_ok`. For QED, exactly the leaks QEMU
/// miscounts on every large file ([`qemu_qed_phantom_leaks`]) count as clean.
pub fn qemu_check(fmt: &str, img: &Path, leaks_ok: bool) -> Result<(), String> {
    let (code, out) = sh("qemu-img", &["check", "-f", fmt, s(img)])?;
    if code == 0 || (leaks_ok && code == 3) {
        return Ok(());
    }
    if code == 3 && fmt == "qed" {
        let (_, json) = sh("qemu-img", &["check", "--output=json", "-f", fmt, s(img)])?;
        let leaks = json_field(&json, "leaks");
        let phantom = qemu_qed_phantom_leaks(img)?;
        if json_field(&json, "corruptions") == 0 && leaks == phantom {
            return Ok(());
        }
        return Err(format!(
            "qemu-img check exited {code} ({leaks} leaks, {phantom} of them QEMU's miscount): {}",
            out.trim()
        ));
    }
    Err(format!("qemu-img check exited {code}: {}", out.trim()))
}

/// A number field of `qemu-img check --output=json` (absent = 0).
fn json_field(text: &str, key: &str) -> u64 {
    let json = text.find('{').map_or("", |i| &text[i..]);
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get(key).and_then(|n| n.as_u64()))
        .unwrap_or(0)
}

/// The clusters QEMU's QED check reports as leaked in a file where every cluster is referenced:
/// its `qed_bytes_to_clusters` (block/qed.h) divides by `cluster_size - 1`, not `cluster_size`,
/// so the leak scan runs over n + n / (cluster_size - 1) clusters for a file of n clusters and
/// the bits it marks are spread over that range (cluster k lands on k + k / (cluster_size - 1)).
/// Every QED file of at least cluster_size - 1 clusters (16 MiB with 4 KiB clusters, 4 GiB with
/// 64 KiB) shows n / (cluster_size - 1) leaks more than it has; real leaks add to that.
pub fn qemu_qed_phantom_leaks(img: &Path) -> Result<u64, String> {
    let f = File::open(img).map_err(|e| format!("{}: {e}", img.display()))?;
    let mut h = [0u8; 8];
    f.read_exact_at(&mut h, 0)
        .map_err(|e| format!("{}: {e}", img.display()))?;
    let cs = u64::from(u32::from_le_bytes([h[4], h[5], h[6], h[7]]));
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if cs < 2 {
        return Err(format!("{}: QED cluster size {cs}", img.display()));
    }
    Ok(len / cs / (cs - 1))
}

fn qemu_raw(fmt: Option<&str>, img: &Path, out: &Path) -> Result<Vec<u8>, String> {
    let mut a = vec!["convert"];
    if let Some(f) = fmt {
        a.extend_from_slice(&["-f", f]);
    }
    a.extend_from_slice(&["-O", "raw", s(img), s(out)]);
    sh_ok("qemu-img", &a)?;
    let v = std::fs::read(out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(out);
    Ok(v)
}

fn wait_dead(pid: i32) {
    let end = Instant::now() + std::time::Duration::from_secs(30);
    while Instant::now() < end {
        let alive = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().any(|t| {
                    let st = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    let state = st.rsplit_once(") ").map(|x| x.1.chars().next());
                    !matches!(state, None | Some(Some('Z')) | Some(Some('X')) | Some(None))
                })
            })
            .unwrap_or(false);
        if !alive {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting

/// First difference between `got` and `want` (which start at disk offset `off`), as a short hex
/// diff of 32 bytes around it.
pub fn diff(got: &[u8], want: &[u8], off: u64) -> Option<String> {
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let s = i.saturating_sub(8) & !7;
    let e = (s + 32).min(got.len());
    let hex = |v: &[u8]| {
        v.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let ndiff = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "first difference at {:#x} ({} bytes differ in {:#x}+{:#x})\n  at {:#x} got  {}\n  at {:#x} want {}",
        off + i as u64,
        ndiff,
        off,
        got.len(),
        off + s as u64,
        hex(&got[s..e]),
        off + s as u64,
        hex(&want[s..e])
    ))
}

// ---------------------------------------------------------------------------------------------
// The random workload

#[derive(Default)]
struct Counters {
    v: [AtomicU64; 12],
}

const NAMES: [&str; 12] = [
    "writes",
    "direct-writes",
    "mmap-writes",
    "punches",
    "zero-ranges",
    "reads",
    "direct-reads",
    "mmap-reads",
    "seeks",
    "fsyncs",
    "reopens",
    "ops",
];

impl Counters {
    fn add(&self, i: usize) {
        self.v[i].fetch_add(1, Ordering::Relaxed);
    }
    fn summary(&self) -> String {
        NAMES
            .iter()
            .zip(&self.v)
            .map(|(n, v)| format!("{n} {}", v.load(Ordering::Relaxed)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
const W_BUF: usize = 0;
const W_DIRECT: usize = 1;
const W_MMAP: usize = 2;
const PUNCH: usize = 3;
const ZERO: usize = 4;
const R_BUF: usize = 5;
const R_DIRECT: usize = 6;
const R_MMAP: usize = 7;
const SEEK: usize = 8;
const FSYNC: usize = 9;
const REOPEN: usize = 10;
const OPS: usize = 11;

/// Everything the threads of one epoch share.
struct Epoch<'a> {
    seed: u64,
    file: &'a Path,
    model: &'a Chunks,
    durable: Option<&'a Durable>,
    points: &'a [u64],
    /// Operation numbers of this epoch start here (numbers are global over the run).
    op_base: u64,
    next: AtomicU64,
    budget: u64,
    kill_at: Option<u64>,
    pid: i32,
    killed: AtomicBool,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
    writers: u64,
    /// All I/O through O_DIRECT (no page cache) in this epoch; otherwise buffered, mmap and
    /// direct reads. Never both kinds of writes at once: the kernel does not keep cached pages
    /// coherent with concurrent direct writes into the same page.
    direct: bool,
    mmap_ok: bool,
    cluster: u64,
    hot_base: u64,
    /// Bytes around the hot spot the writers share (one chunk each at least).
    hot_len: u64,
    counters: &'a Counters,
}

impl Epoch<'_> {
    /// Claim the next operation number, or None when the epoch is over.
    fn next_op(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if n >= self.budget {
            return None;
        }
        if self.kill_at == Some(n) {
            self.killed.store(true, Ordering::SeqCst);
            // SAFETY: plain kill(2) on the daemon's pid.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.stop.store(true, Ordering::SeqCst);
            return None;
        }
        self.counters.add(OPS);
        Some(self.op_base + n)
    }

    /// The hot spot at operation `n`: a cluster-aligned offset that moves on to the next cluster
    /// every few operations, so the writers keep meeting in clusters not yet allocated.
    fn hot(&self, n: u64) -> u64 {
        let span = self.model.size - self.hot_len;
        (self.hot_base + (n - self.op_base) / 12 * self.cluster) % span / self.cluster
            * self.cluster
    }

    fn fail(&self, msg: String) {
        if self.killed.load(Ordering::SeqCst) {
            // After the kill every call may fail: not a finding.
            return;
        }
        let mut f = self.failure.lock();
        if f.is_none() {
            *f = Some(format!("seed {:#x}: {msg}", self.seed));
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pick_len(rng: &mut SplitMix64) -> u64 {
    let r = rng.below(100);
    let mut len = match r {
        0..=34 => 1 + rng.below(512),
        35..=59 => 1 + rng.below(8192),
        60..=88 => 1 + rng.below(65536),
        89..=97 => 1 + rng.below(1 << 20),
        _ => 1 + rng.below(6 << 20),
    };
    if rng.below(4) == 0 {
        len = (len + 4095) & !4095;
    }
    len
}

/// An offset for `len` bytes inside `lo..hi`: near an interesting point (cluster boundary, disk
/// end, backing end), aligned, or anywhere.
fn pick_off(rng: &mut SplitMix64, points: &[u64], lo: u64, hi: u64, len: u64) -> u64 {
    let room = hi - lo - len;
    let off = match rng.below(3) {
        0 => {
            let a = points.partition_point(|&p| p < lo);
            let b = points.partition_point(|&p| p <= hi);
            if a < b {
                let p = points[a + rng.below((b - a) as u64) as usize] as i64;
                let delta: i64 = match rng.below(8) {
                    0 => 0,
                    1 => -1,
                    2 => 1,
                    3 => -512,
                    4 => 512,
                    5 => -(len as i64),
                    6 => -(len as i64) / 2,
                    _ => -(rng.below(4096) as i64),
                };
                (p + delta).max(0) as u64
            } else {
                lo + rng.below(room + 1)
            }
        }
        1 => {
            let align = [512u64, 4096, 65536][rng.below(3) as usize];
            lo + rng.below(room / align + 1) * align
        }
        _ => lo + rng.below(room + 1),
    };
    off.clamp(lo, lo + room)
}

struct Fds {
    buf: File,
    direct: File,
}

fn open_fds(path: &Path, write: bool) -> std::io::Result<Fds> {
    let buf = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    Ok(Fds { buf, direct })
}

/// A 4 KiB-aligned buffer (for O_DIRECT).
struct Aligned {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let start = v.as_ptr().align_offset(4096);
        Aligned { v, start, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

fn io_read(fds: &Fds, how: usize, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
    match how {
        R_DIRECT => {
            let mut a = Aligned::new(len as usize);
            fds.direct.read_exact_at(a.buf(), off)?;
            Ok(a.buf().to_vec())
        }
        R_MMAP => mmap_io(&fds.buf, off, len, None),
        _ => {
            let mut v = vec![0u8; len as usize];
            fds.buf.read_exact_at(&mut v, off)?;
            Ok(v)
        }
    }
}

/// Map the pages covering `off..off+len`; read them, or write `data` there and msync.
fn mmap_io(f: &File, off: u64, len: u64, data: Option<&[u8]>) -> std::io::Result<Vec<u8>> {
    let start = off & !(PAGE - 1);
    let end = (off + len).div_ceil(PAGE) * PAGE;
    let maplen = (end - start) as usize;
    let prot = if data.is_some() {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of the file, used only inside this function and unmapped
    // before it returns; the ranges touched lie inside it.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            maplen,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            start as libc::off_t,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let at = (p as *mut u8).add((off - start) as usize);
        let r = match data {
            Some(d) => {
                std::ptr::copy_nonoverlapping(d.as_ptr(), at, d.len());
                if libc::msync(p, maplen, libc::MS_SYNC) != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(Vec::new())
                }
            }
            None => Ok(std::slice::from_raw_parts(at, len as usize).to_vec()),
        };
        libc::munmap(p, maplen);
        r
    }
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate(2) on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// lseek(SEEK_DATA/SEEK_HOLE): None for ENXIO.
fn seek(f: &File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek(2) on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn check_read(ep: &Epoch, n: u64, who: &str, how: usize, off: u64, got: &[u8], want: &[u8]) {
    if let Some(d) = diff(got, want, off) {
        ep.fail(format!(
            "op {n} ({who}, {} of {:#x}+{:#x}): {d}",
            NAMES[how],
            off,
            got.len()
        ));
    }
}

fn writer(ep: &Epoch, w: u64) {
    let mut rng = SplitMix64::new(ep.seed ^ (ep.op_base << 8) ^ ((w + 1) * 0x9e37_79b9));
    let who = format!("writer {w}");
    let mut fds = match open_fds(ep.file, true) {
        Ok(f) => f,
        Err(e) => return ep.fail(format!("{who}: open: {e}")),
    };
    let nchunks = ep.model.count();
    let own = nchunks.saturating_sub(w).div_ceil(ep.writers);
    if own == 0 {
        return;
    }
    while let Some(n) = ep.next_op() {
        // A chunk of ours: half the time the one nearest an interesting point.
        let mut c = w + ep.writers * rng.below(own);
        let r = rng.below(10);
        if r < 4 {
            // Every writer into the same fresh cluster(s): disjoint pieces of one allocation.
            let c0 = ep.hot(n) / ep.model.chunk;
            c = c0 - c0 % ep.writers + w;
            if c < c0 {
                c += ep.writers;
            }
            if c >= nchunks {
                c = w;
            }
        } else if r < 7 {
            let p = ep.points[rng.below(ep.points.len() as u64) as usize].min(ep.model.size - 1);
            let pc = p / ep.model.chunk;
            let cand = pc - pc % ep.writers + w;
            c = if cand < nchunks {
                cand
            } else {
                cand.saturating_sub(ep.writers)
            };
        }
        let (lo, hi) = ep.model.range_of(c);
        let mut len = pick_len(&mut rng).min(hi - lo);
        let mut off = pick_off(&mut rng, ep.points, lo, hi, len);
        let r = rng.below(100);
        let mut kind = match r {
            0..=23 => W_BUF,
            24..=37 => W_DIRECT,
            38..=45 => W_MMAP,
            46..=51 => PUNCH,
            52..=57 => ZERO,
            58..=75 => R_BUF,
            76..=84 => SEEK,
            85..=93 => FSYNC,
            _ => REOPEN,
        };
        if ep.direct {
            kind = match kind {
                W_BUF | W_MMAP => W_DIRECT,
                R_BUF => R_DIRECT,
                k => k,
            };
        } else if kind == W_DIRECT || (kind == W_MMAP && !ep.mmap_ok) {
            kind = W_BUF;
        }
        if kind == W_MMAP {
            len = len.min(1 << 20);
        }
        if kind == W_DIRECT || (kind == R_BUF && ep.direct) {
            // 512-byte units inside the chunk (chunks are multiples of 512).
            off &= !511;
            len = ((len + 511) & !511).min(hi - off);
        }
        let mut g = ep.model.lock(c);
        let rel = (off - lo) as usize;
        match kind {
            W_BUF | W_DIRECT | W_MMAP => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                if rng.below(16) == 0 {
                    // Some zero writes: the format may store them as zero clusters.
                    data.fill(0);
                }
                let data = std::sync::Arc::new(data);
                let id = ep.durable.map(|d| d.begin(off, Data::Bytes(data.clone())));
                let r = match kind {
                    W_BUF => fds.buf.write_all_at(&data, off),
                    W_DIRECT => {
                        let mut a = Aligned::new(data.len());
                        a.buf().copy_from_slice(&data);
                        fds.direct.write_all_at(a.buf(), off)
                    }
                    _ => mmap_io(&fds.buf, off, len, Some(&data)).map(|_| ()),
                };
                if let Err(e) = r {
                    return ep.fail(format!(
                        "op {n} ({who}): {} {off:#x}+{len:#x}: {e}",
                        NAMES[kind]
                    ));
                }
                if let (Some(d), Some(id)) = (ep.durable, id) {
                    d.complete(id);
                }
                g[rel..rel + len as usize].copy_from_slice(&data);
            }
            PUNCH | ZERO => {
                let mode = if kind == PUNCH {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE
                };
                let id = ep.durable.map(|d| d.begin(off, Data::Zeros(len)));
                if let Err(e) = fallocate(&fds.buf, mode, off, len) {
                    return ep.fail(format!(
                        "op {n} ({who}): {} {off:#x}+{len:#x}: {e}",
                        NAMES[kind]
                    ));
                }
                if let (Some(d), Some(id)) = (ep.durable, id) {
                    d.complete(id);
                }
                g[rel..rel + len as usize].fill(0);
            }
            R_BUF | R_DIRECT => {
                let how = if ep.direct {
                    R_DIRECT
                } else {
                    [R_BUF, R_DIRECT, R_MMAP][rng.below(if ep.mmap_ok { 3 } else { 2 }) as usize]
                };
                let (off, len) = if how == R_DIRECT {
                    let o = off & !511;
                    (o, ((len + 511) & !511).min(hi - o))
                } else {
                    (off, len)
                };
                match io_read(&fds, how, off, len) {
                    Ok(got) => {
                        let rel = (off - lo) as usize;
                        check_read(ep, n, &who, how, off, &got, &g[rel..rel + len as usize])
                    }
                    Err(e) => {
                        return ep.fail(format!(
                            "op {n} ({who}): {} {off:#x}+{len:#x}: {e}",
                            NAMES[how]
                        ))
                    }
                }
                ep.counters.add(how);
                continue;
            }
            SEEK => {
                // A hole never hides data: from `off` to the next data (or the hole found) the
                // bytes of this chunk (stable: we own it) must be zeros.
                let r = seek(&fds.buf, off, libc::SEEK_DATA).and_then(|d| {
                    let h = seek(&fds.buf, off, libc::SEEK_HOLE)?;
                    let hd = match h {
                        Some(h) if h < hi => seek(&fds.buf, h, libc::SEEK_DATA)?,
                        _ => None,
                    };
                    Ok((d, h, hd))
                });
                match r {
                    Err(e) => return ep.fail(format!("op {n} ({who}): lseek at {off:#x}: {e}")),
                    Ok((d, h, hd)) => {
                        let size = ep.model.size;
                        let d = d.unwrap_or(size);
                        let h = h.unwrap_or(size);
                        let mut bad = None;
                        if d < off || h < off || h > size {
                            bad =
                                Some(format!("SEEK_DATA {d:#x} / SEEK_HOLE {h:#x} from {off:#x}"));
                        }
                        let zero_until = |from: u64, to: u64| {
                            let to = to.min(hi);
                            (from < to)
                                .then(|| {
                                    g[(from - lo) as usize..(to - lo) as usize]
                                        .iter()
                                        .position(|&b| b != 0)
                                        .map(|i| from + i as u64)
                                })
                                .flatten()
                        };
                        if let Some(x) = zero_until(off, d) {
                            bad = Some(format!("SEEK_DATA from {off:#x} says data starts at {d:#x}, but byte {x:#x} holds data"));
                        }
                        if h < hi {
                            let hd = hd.unwrap_or(size);
                            if let Some(x) = zero_until(h, hd) {
                                bad = Some(format!("SEEK_HOLE from {off:#x} says a hole starts at {h:#x} (data again at {hd:#x}), but byte {x:#x} holds data"));
                            }
                        }
                        if let Some(b) = bad {
                            return ep.fail(format!("op {n} ({who}): {b}"));
                        }
                    }
                }
            }
            FSYNC => {
                drop(g);
                let start = ep.durable.map(|d| d.sync_start());
                let f = if rng.below(2) == 0 {
                    &fds.buf
                } else {
                    &fds.direct
                };
                let r = if rng.below(2) == 0 {
                    f.sync_all()
                } else {
                    f.sync_data()
                };
                if let Err(e) = r {
                    return ep.fail(format!("op {n} ({who}): fsync: {e}"));
                }
                if let (Some(d), Some(s)) = (ep.durable, start) {
                    d.synced(s);
                }
                ep.counters.add(FSYNC);
                continue;
            }
            _ => {
                drop(g);
                drop(fds);
                fds = match open_fds(ep.file, true) {
                    Ok(f) => f,
                    Err(e) => return ep.fail(format!("op {n} ({who}): reopen: {e}")),
                };
                ep.counters.add(REOPEN);
                continue;
            }
        }
        ep.counters.add(kind);
    }
}

fn reader(ep: &Epoch, r: u64) {
    let mut rng = SplitMix64::new(ep.seed ^ (ep.op_base << 8) ^ ((r + 1) * 0xbf58_476d));
    let who = format!("reader {r}");
    let fds = match open_fds(ep.file, false) {
        Ok(f) => f,
        Err(e) => return ep.fail(format!("{who}: open: {e}")),
    };
    let size = ep.model.size;
    while let Some(n) = ep.next_op() {
        if rng.below(50) == 0 {
            // A read across the end of the disk returns exactly the bytes up to the end.
            let mut off = size - 1 - rng.below(8192);
            if ep.direct {
                off &= !511;
            }
            let want_len = size - off;
            // Locked before the read, as every read: no writer changes these bytes meanwhile.
            let view = ep.model.read(off, want_len);
            let mut a = Aligned::new((want_len + 1 + rng.below(8192)) as usize);
            let f = if ep.direct { &fds.direct } else { &fds.buf };
            match f.read_at(a.buf(), off) {
                Ok(k) if k as u64 == want_len => {
                    check_read(ep, n, &who, R_BUF, off, &a.buf()[..k], &view.bytes(off, want_len))
                }
                Ok(k) => {
                    return ep.fail(format!(
                        "op {n} ({who}): read across the end from {off:#x} returned {k} bytes, want {want_len}"
                    ))
                }
                Err(e) => {
                    return ep.fail(format!(
                        "op {n} ({who}): read across the end from {off:#x}: {e}"
                    ))
                }
            }
            ep.counters.add(R_BUF);
            continue;
        }
        let len = pick_len(&mut rng).min(2 << 20).min(size);
        let mut off = if rng.below(3) == 0 {
            let h = ep.hot(n);
            pick_off(
                &mut rng,
                ep.points,
                h,
                (h + ep.hot_len).min(size),
                len.min(ep.hot_len),
            )
        } else {
            pick_off(&mut rng, ep.points, 0, size, len)
        };
        let len = len.min(size - off);
        let how = if ep.direct {
            R_DIRECT
        } else {
            [R_BUF, R_BUF, R_DIRECT, R_MMAP][rng.below(if ep.mmap_ok { 4 } else { 3 }) as usize]
        };
        let mut len = len;
        if how == R_DIRECT {
            off &= !511;
            len = ((len + 511) & !511).min(size - off);
        }
        let view = ep.model.read(off, len);
        match io_read(&fds, how, off, len) {
            Ok(got) => check_read(ep, n, &who, how, off, &got, &view.bytes(off, len)),
            Err(e) => {
                return ep.fail(format!(
                    "op {n} ({who}): {} {off:#x}+{len:#x}: {e}",
                    NAMES[how]
                ))
            }
        }
        ep.counters.add(how);
    }
}

/// Read the whole exposed file and compare it with `want`.
fn verify_all(file: &Path, want: &[u8], what: &str) -> Result<(), String> {
    let got = std::fs::read(file).map_err(|e| format!("{what}: read {}: {e}", file.display()))?;
    if got.len() != want.len() {
        return Err(format!("{what}: size {} != {}", got.len(), want.len()));
    }
    match diff(&got, want, 0) {
        Some(d) => Err(format!("{what}: {d}")),
        None => Ok(()),
    }
}

fn run_case(case: &cases::Case, args: &Args, seed: u64) -> Result<String, String> {
    let scratch = Scratch::new(args, case.name, seed)?;
    let mut scratch = scratch;
    let dir = scratch.path.clone();
    let mnt = dir.join("mnt");
    let img = cases::build(case, &dir, SIZE, BSIZE, &args.imgfs, seed)?;
    let mut bytes = match case.initial {
        "" => vec![0u8; SIZE as usize],
        "$IMG" => qemu_raw(Some(case.fmt), &img, &dir.join("initial.raw"))?,
        f => qemu_raw(None, &dir.join(f), &dir.join("initial.raw"))?,
    };
    bytes.resize(SIZE as usize, 0);
    let snap_raw = |what: &str| -> Result<Vec<u8>, String> {
        let out = dir.join(format!("snap-{what}.raw"));
        let opt = format!("snapshot.name={}", case.snapshot);
        sh_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                case.fmt,
                "-l",
                &opt,
                "-O",
                "raw",
                s(&img),
                s(&out),
            ],
        )?;
        let v = std::fs::read(&out).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&out);
        Ok(v)
    };
    let snap_before = if case.snapshot.is_empty() {
        None
    } else {
        Some(snap_raw("before")?)
    };

    let mut points: Vec<u64> = (0..=SIZE / case.cluster)
        .map(|i| i * case.cluster)
        .collect();
    points.extend([SIZE, 512, SIZE - 512]);
    if case.backing {
        points.extend([BSIZE, BSIZE & !(case.cluster - 1)]);
    }
    points.sort_unstable();
    points.dedup();

    let counters = Counters::default();
    let mut rng = SplitMix64::new(seed);
    let file = mnt.join("disk.raw");
    let mut pid = mount(&args.imgfs, &img, &mnt, &[])?;
    let mut done = 0u64;
    let (mut epochs, mut remounts, mut crashes, mut verifies) = (0u64, 0u64, 0u64, 0u64);
    let durable = (args.crash > 0).then(|| Durable::new(bytes.clone()));
    let chunk_choices: Vec<u64> = [
        1024,
        2048,
        case.cluster / 4,
        case.cluster / 2,
        case.cluster,
        4 * case.cluster,
        1 << 20,
        8 << 20,
    ]
    .into_iter()
    .filter(|&c| c >= 512 && c % 512 == 0 && SIZE / c >= args.writers)
    .collect();
    let result: Result<(), String> = (|| {
        while done < args.ops || crashes < args.crash {
            let chunk = chunk_choices[rng.below(chunk_choices.len() as u64) as usize];
            let direct = chunk < PAGE || rng.below(3) == 0;
            let budget = 300 + rng.below(1500);
            let kill_at = (crashes < args.crash
                && (done + budget >= args.ops || rng.below(3) == 0))
                .then(|| rng.below(budget));
            let model = Chunks::new(std::mem::take(&mut bytes), chunk);
            let ep = Epoch {
                seed,
                file: &file,
                model: &model,
                durable: durable.as_ref(),
                points: &points,
                op_base: done,
                next: AtomicU64::new(0),
                budget,
                kill_at,
                pid,
                killed: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                failure: Mutex::new(None),
                writers: args.writers,
                direct,
                // A mapped page that faults after the kill raises SIGBUS: no mmap in kill epochs.
                mmap_ok: chunk.is_multiple_of(PAGE) && kill_at.is_none(),
                cluster: case.cluster,
                hot_base: rng.below(SIZE),
                hot_len: (chunk * args.writers).max(case.cluster),
                counters: &counters,
            };
            std::thread::scope(|sc| {
                for w in 0..args.writers {
                    let ep = &ep;
                    sc.spawn(move || writer(ep, w));
                }
                for r in 0..args.readers {
                    let ep = &ep;
                    sc.spawn(move || reader(ep, r));
                }
            });
            let used = ep.next.load(Ordering::SeqCst).min(budget);
            let failure = ep.failure.lock().take();
            let killed = ep.killed.load(Ordering::SeqCst);
            drop(ep);
            bytes = model.into_bytes();
            if let Some(f) = failure {
                return Err(format!(
                    "{f}\n  (epoch {epochs}: chunk {chunk:#x}, {}; replay with --seed {seed:#x} --writers {} --readers {})",
                    if direct { "O_DIRECT" } else { "cached" },
                    args.writers,
                    args.readers
                ));
            }
            if (done + used) / 100_000 > done / 100_000 {
                eprintln!("{}: {} ops", case.name, done + used);
            }
            done += used;
            epochs += 1;
            if killed {
                crashes += 1;
                let d = durable.as_ref().expect("crash mode");
                wait_dead(pid);
                let _ = sh("umount", &["-l", s(&mnt)]);
                pid = mount(&args.imgfs, &img, &mnt, &[])?;
                let got = std::fs::read(&file).map_err(|e| format!("read after kill: {e}"))?;
                d.verify(&got).map_err(|(_, m)| {
                    format!("seed {seed:#x}: after kill -9 at op {}: {m}", done)
                })?;
                umount(&args.imgfs, &mnt)?;
                imgfs_check(&args.imgfs, case.fmt, &img, true)
                    .map_err(|e| format!("after kill -9 round {crashes}: {e}"))?;
                if case.qemu_check {
                    qemu_check(case.fmt, &img, true)
                        .map_err(|e| format!("after kill -9 round {crashes}: {e}"))?;
                }
                pid = mount(&args.imgfs, &img, &mnt, &[])?;
                d.reset(got.clone());
                bytes = got;
                continue;
            }
            match rng.below(10) {
                0 => {
                    umount(&args.imgfs, &mnt)?;
                    if let Some(d) = &durable {
                        // A clean unmount flushed everything.
                        d.synced(d.sync_start());
                    }
                    imgfs_check(&args.imgfs, case.fmt, &img, crashes > 0)
                        .map_err(|e| format!("seed {seed:#x}: after op {done}: {e}"))?;
                    pid = mount(&args.imgfs, &img, &mnt, &[])?;
                    remounts += 1;
                    verify_all(
                        &file,
                        &bytes,
                        &format!("seed {seed:#x}: remount after op {done}"),
                    )?;
                    verifies += 1;
                }
                1 => {
                    verify_all(
                        &file,
                        &bytes,
                        &format!("seed {seed:#x}: read-back after op {done}"),
                    )?;
                    verifies += 1;
                }
                _ => {}
            }
        }
        // The end: everything through a fresh mount, the checkers, and QEMU's view.
        umount(&args.imgfs, &mnt)?;
        imgfs_check(&args.imgfs, case.fmt, &img, crashes > 0)
            .map_err(|e| format!("seed {seed:#x}: at the end: {e}"))?;
        if case.qemu_check {
            qemu_check(case.fmt, &img, crashes > 0)
                .map_err(|e| format!("seed {seed:#x}: at the end: {e}"))?;
        }
        let final_bytes = if case.qemu_reads {
            qemu_raw(Some(case.fmt), &img, &dir.join("final.raw"))?
        } else {
            mount(&args.imgfs, &img, &mnt, &["--read-only"])?;
            let v = std::fs::read(&file).map_err(|e| e.to_string())?;
            umount(&args.imgfs, &mnt)?;
            v
        };
        if let Some(before) = &snap_before {
            if let Some(d) = diff(&snap_raw("after")?, before, 0) {
                return Err(format!(
                    "seed {seed:#x}: snapshot {} changed during the run: {d}",
                    case.snapshot
                ));
            }
        }
        if let Some(d) = diff(&final_bytes, &bytes, 0) {
            return Err(format!(
                "seed {seed:#x}: {} after the run differs from the model: {d}",
                if case.qemu_reads {
                    "qemu-img convert -O raw"
                } else {
                    "a fresh read-only mount"
                }
            ));
        }
        Ok(())
    })();
    if let Err(e) = result {
        if is_mounted(&mnt) {
            let _ = umount(&args.imgfs, &mnt);
        }
        scratch.keep = true;
        return Err(e);
    }
    Ok(format!(
        "{done} ops in {epochs} epochs ({}), {remounts} remounts, {verifies} full read-backs, {crashes} kill -9 rounds",
        counters.summary()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Finding 4 (docs/reliability.md): a QED file that QEMU itself wrote, every cluster
    /// referenced once, still gets n / (cluster_size - 1) leaks from `qemu-img check`. The tester
    /// accepts exactly that many, and no more: one truly leaked cluster still fails.
    #[test]
    fn qemu_qed_miscount_is_tolerated_and_real_leaks_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("t.qed");
        let img_s = img.to_str().unwrap();
        sh_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qed",
                "-o",
                "cluster_size=4096",
                img_s,
                "48M",
            ],
        )
        .unwrap();
        // 17 MiB of data: 4,369 clusters in the file with header, L1 and three L2 tables.
        sh_ok("qemu-io", &["-f", "qed", "-c", "write 0 17M", img_s]).unwrap();
        let len = std::fs::metadata(&img).unwrap().len();
        assert_eq!(len / 4096, 4369);
        assert_eq!(qemu_qed_phantom_leaks(&img).unwrap(), 1);
        let (code, out) = sh("qemu-img", &["check", "--output=json", "-f", "qed", img_s]).unwrap();
        assert_eq!((code, json_field(&out, "leaks")), (3, 1), "{out}");
        qemu_check("qed", &img, false).unwrap();
        // One cluster nothing references, at the end of the file: a real leak.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len + 4096)
            .unwrap();
        let e = qemu_check("qed", &img, false).unwrap_err();
        assert!(e.contains("2 leaks, 1 of them QEMU's miscount"), "{e}");
        qemu_check("qed", &img, true).unwrap();
    }
}
