//! Shared helpers for end-to-end tests: QEMU as the oracle, temporary directories, and real
//! FUSE mounts that are always cleaned up.
#![allow(dead_code)]

mod image;
#[allow(unused_imports)]
pub use image::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Every child process of a test binary is started under this lock (`Spawn`). From fork to
/// exec a child holds a copy of every descriptor the test process has open, including files
/// other test threads have open at that moment: a file inside a mount (whose `umount` then
/// fails with "target is busy") or an image (whose OFD lock qemu-img then sees). `spawn`
/// returns only after the child's exec closed those copies, so with spawns one at a time, a
/// child started after a thread closed a file can never be holding it.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starting children under `SPAWN`; tests use these instead of `Command::spawn`/`output`.
pub trait Spawn {
    fn spawn_child(&mut self) -> std::io::Result<Child>;
    /// `Command::output`: stdin from /dev/null, stdout and stderr captured.
    fn run_output(&mut self) -> std::io::Result<Output>;
}

impl Spawn for Command {
    fn spawn_child(&mut self) -> std::io::Result<Child> {
        let _one_at_a_time = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
        self.spawn()
    }

    fn run_output(&mut self) -> std::io::Result<Output> {
        self.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn_child()?
            .wait_with_output()
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .run_output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Run a command that must succeed; returns stdout.
pub fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    ok("qemu-img", args)
}

/// `qemu-io -f FMT IMG -c CMD...`, each command must succeed.
/// `qemu-img create -f qcow2 -b BACKING -F qcow2 TOP` (BACKING as written into the header).
pub fn qcow2_overlay(top: &Path, backing: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
}

pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt, img.to_str().unwrap()];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = ok("qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {args:?}: {out}"
    );
}

/// What QEMU says the guest sees: `qemu-img convert -O raw`.
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("expect-raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Exit code of `qemu-img check` (0 clean, 2 corrupt, 3 leaks) and its output.
pub fn qemu_check(fmt: &str, img: &Path) -> (i32, String) {
    qemu_check_with(&[], fmt, img)
}

/// `qemu-img check EXTRA... -f FMT IMG`: exit code and output.
fn qemu_check_with(extra: &[&str], fmt: &str, img: &Path) -> (i32, String) {
    let mut args = vec!["check"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-f", fmt, img.to_str().unwrap()]);
    let out = run("qemu-img", &args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check` must find no corruption and no leaks.
pub fn assert_check_clean(fmt: &str, img: &Path) {
    let (code, out) = qemu_check(fmt, img);
    assert_eq!(code, 0, "qemu-img check {}: {out}", img.display());
}

/// `qemu-img compare` of an image with a raw file of the expected content.
pub fn assert_compare(fmt: &str, img: &Path, expect_raw: &Path) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fmt,
            "-F",
            "raw",
            img.to_str().unwrap(),
            expect_raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of an image against expected guest bytes (written beside it as `.want`).
pub fn assert_compare_bytes(fmt: &str, img: &Path, want: &[u8]) {
    let exp = img.with_extension("want");
    std::fs::write(&exp, want).unwrap();
    assert_compare(fmt, img, &exp);
}

/// Compare two byte slices and report the first difference (not a 100 MiB assert dump).
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: first difference at byte {i:#x}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// A scratch directory under /tmp (removed on drop).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgfs-test-")
        .tempdir()
        .unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = imgfs::host::SplitMix64::new(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v);
    v
}

/// Write `bytes` to a file and return its path (for `qemu-io -c 'write -s FILE ...'`).
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Read the whole guest through the engine (no FUSE).
pub fn engine_read_all(img: &imgfs::Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

/// Default open options, read-only or read-write.
pub fn open_opts(read_only: bool) -> imgfs::OpenOpts {
    imgfs::OpenOpts {
        read_only,
        ..imgfs::OpenOpts::default()
    }
}

/// Open an image file (read-only or read-write), read the whole guest, close it.
pub fn open_read_all(p: &Path, read_only: bool) -> Vec<u8> {
    let im = imgfs::Image::open(p, &open_opts(read_only)).unwrap();
    let v = engine_read_all(&im);
    im.close().unwrap();
    v
}

/// `qemu-img check -r all` (QEMU's repair, which for VHDX replays a dirty log) must succeed:
/// exit 0, or 3 (leaks found and fixed) when `leaks_ok`.
pub fn qemu_repair(fmt: &str, img: &Path, leaks_ok: bool, what: &str) {
    let (code, out) = qemu_check_with(&["-r", "all"], fmt, img);
    assert!(
        code == 0 || (leaks_ok && code == 3),
        "{what}: qemu-img check -r all exited {code}: {out}"
    );
}

pub const IMGFS: &str = env!("CARGO_BIN_EXE_imgfs");

/// A real imgfs mount (daemonized `imgfs mount`), unmounted on drop even if the test failed.
pub struct Mount {
    pub dir: PathBuf,
    pub stderr: String,
}

impl Mount {
    /// `imgfs mount EXTRA... IMAGES... DIR`; panics if it fails.
    pub fn new(images: &[&Path], dir: &Path, extra: &[&str]) -> Mount {
        match Self::try_new(images, dir, extra) {
            Ok(m) => m,
            Err(e) => panic!("imgfs mount failed: {e}"),
        }
    }

    pub fn try_new(images: &[&Path], dir: &Path, extra: &[&str]) -> Result<Mount, String> {
        // Not `exists()`: a dead mount left by a killed daemon fails stat without being absent.
        if std::fs::metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            std::fs::create_dir_all(dir).unwrap();
        }
        let mut args: Vec<String> = vec!["mount".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(images.iter().map(|p| p.display().to_string()));
        args.push(dir.display().to_string());
        let out = Command::new(IMGFS).args(&args).run_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(stderr);
        }
        Ok(Mount {
            dir: dir.to_path_buf(),
            stderr,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The names in the mount's root, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// The daemon's pid (from the root's xattr).
    pub fn pid(&self) -> i32 {
        let out = ok(
            "getfattr",
            &[
                "--only-values",
                "-n",
                "user.imgfs.pid",
                self.dir.to_str().unwrap(),
            ],
        );
        out.trim().parse().unwrap()
    }

    /// `imgfs umount`, which must succeed.
    pub fn umount_ok(self) {
        let (umounted, err) = self.umount();
        assert!(umounted, "umount: {err}");
    }

    /// `imgfs umount`; returns its exit status and stderr.
    pub fn umount(mut self) -> (bool, String) {
        let r = umount_dir(&self.dir);
        if r.0 {
            // Done; otherwise Drop still detaches the mount.
            self.dir = PathBuf::new();
        }
        r
    }
}

pub fn umount_dir(dir: &Path) -> (bool, String) {
    let out = run(IMGFS, &["umount", dir.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn is_mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let d = dir.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(d.as_str()))
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let (ok, _) = umount_dir(&self.dir);
        if !ok || is_mounted(&self.dir) {
            let _ = run("umount", &["-l", self.dir.to_str().unwrap()]);
        }
    }
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn new(file: &Path, extra: &[&str]) -> Loop {
        let mut args = vec!["-f", "--show"];
        args.extend_from_slice(extra);
        args.push(file.to_str().unwrap());
        let dev = ok("losetup", &args).trim().to_string();
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// A kernel mount of a block device, unmounted on drop.
pub struct KernelMount {
    pub dir: PathBuf,
}

impl KernelMount {
    pub fn new(dev: &str, dir: &Path) -> KernelMount {
        std::fs::create_dir_all(dir).unwrap();
        ok("mount", &[dev, dir.to_str().unwrap()]);
        KernelMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let out = run("umount", &[self.dir.to_str().unwrap()]);
        if !out.status.success() {
            let _ = run("umount", &["-l", self.dir.to_str().unwrap()]);
        }
    }
}

/// pread/pwrite on a path.
pub fn pread(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

pub fn pwrite(path: &Path, off: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, off)?;
    f.sync_all()
}

/// `fallocate MODE -o OFF -l LEN PATH` (mode `--punch-hole`, `--zero-range`, ...), which must
/// succeed.
pub fn fallocate(path: &Path, mode: &str, off: u64, len: u64) {
    let (off, len) = (off.to_string(), len.to_string());
    ok(
        "fallocate",
        &[mode, "-o", &off, "-l", &len, path.to_str().unwrap()],
    );
}

/// Open `path` with O_DIRECT, read-write when `write`.
pub fn open_direct(path: &Path, write: bool) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap()
}

/// O_DIRECT needs an aligned buffer: an aligned window of `len` bytes in a larger one.
fn aligned_window(big: &mut Vec<u8>, len: usize) -> &mut [u8] {
    big.clear();
    big.resize(len + 4096, 0);
    let a = big.as_ptr().align_offset(4096);
    &mut big[a..a + len]
}

/// Read `len` bytes at `off` from an O_DIRECT file.
pub fn direct_read(f: &std::fs::File, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut big = Vec::new();
    let window = aligned_window(&mut big, len);
    f.read_exact_at(window, off).unwrap();
    window.to_vec()
}

/// Write `data` at `off` to an O_DIRECT file.
pub fn direct_write(f: &std::fs::File, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let mut big = Vec::new();
    let window = aligned_window(&mut big, data.len());
    window.copy_from_slice(data);
    f.write_all_at(window, off).unwrap();
}

/// Is any thread of `pid` still running? After SIGKILL the group leader can be a zombie while
/// another thread still finishes a system call (and still holds the process's files and locks).
pub fn process_alive(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let state = stat_fields(&t.path().join("stat")).and_then(|f| f.first()?.chars().next());
        !matches!(state, None | Some('Z') | Some('X'))
    })
}

/// The fields of a `/proc/.../stat` file after the command name (which may hold spaces and
/// parentheses): state first, then ppid, ... (proc(5) numbering minus 3).
fn stat_fields(path: &Path) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    Some(rest.split(' ').map(str::to_string).collect())
}

/// CPU time (user + system, in clock ticks) a process has used so far.
pub fn cpu_ticks(pid: i32) -> u64 {
    let f = stat_fields(Path::new(&format!("/proc/{pid}/stat"))).expect("process stat");
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Lazily unmounts `dir` on drop if it is still mounted (e.g. a dead mount after a failed test).
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
        }
    }
}

/// Wait up to `secs` for `cond`.
pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    cond()
}

/// Open a (damaged) image from memory, read-only and read-write, read `span` bytes in `chunk`
/// pieces, then write and zero a little and close. Errors are fine; a panic fails the test.
pub fn exercise_damaged(
    bytes: &[u8],
    name: &Path,
    fmt: &str,
    span: u64,
    chunk: usize,
    seed: u64,
    write_off: u64,
) {
    for read_only in [true, false] {
        let f = imgfs::host::FaultFile::new(bytes.to_vec());
        let opts = imgfs::OpenOpts {
            format: Some(fmt.into()),
            lock: false,
            read_only,
            ..imgfs::OpenOpts::default()
        };
        let Ok(image) = imgfs::Image::open_host(f.host_file(name, !read_only), &opts) else {
            continue;
        };
        let mut buf = vec![0u8; chunk];
        for off in (0..span).step_by(chunk) {
            let _ = image.read_at(&mut buf, off);
        }
        if !read_only {
            let _ = image.write_at(&[seed as u8; 5000], write_off);
            let _ = image.write_zeroes(0, 64 << 10, true);
            let _ = image.close();
        }
    }
}

/// A VirtualBox differencing child of `parent` (whose header gives the UUIDs), 1 MiB blocks:
/// block 1 holds 0xc1 bytes, block 3 is a zero block, the rest unallocated.
pub fn vdi_differencing_child(parent: &Path, child: &Path) {
    let ph = std::fs::read(parent).unwrap();
    let size = u64::from_le_bytes(ph[0x170..0x178].try_into().unwrap());
    let blocks = size.div_ceil(1u64 << 20) as u32;
    let uuid = |at: usize| -> [u8; 16] { ph[at..at + 16].try_into().unwrap() };
    let ids = [[0xaa; 16], [0xbb; 16], uuid(0x188), uuid(0x198)];
    let mut img = imgfs::formats::vdi::build_header(4, size, (1u64 << 20) as u32, blocks, 1, ids);
    let mut map = vec![0xffu8; imgfs::formats::vdi::bmap_bytes(blocks) as usize];
    map[4..8].copy_from_slice(&0u32.to_le_bytes());
    map[12..16].copy_from_slice(&0xffff_fffeu32.to_le_bytes());
    img.extend_from_slice(&map);
    img.extend(std::iter::repeat_n(0xc1u8, (1u64 << 20) as usize));
    std::fs::write(child, img).unwrap();
}

/// Make /sbin/mount.fuse.imgfs point at the binary under test for the duration of a test.
pub struct MountHelper {
    created: bool,
}

impl MountHelper {
    pub fn install() -> MountHelper {
        let link = Path::new("/sbin/mount.fuse.imgfs");
        let created = match std::fs::read_link(link) {
            Ok(target) if target == Path::new(IMGFS) => false,
            Ok(_) | Err(_) if link.exists() && std::fs::read_link(link).is_err() => false,
            _ => {
                let _ = std::fs::remove_file(link);
                std::os::unix::fs::symlink(IMGFS, link).unwrap();
                true
            }
        };
        MountHelper { created }
    }
}

impl Drop for MountHelper {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file("/sbin/mount.fuse.imgfs");
        }
    }
}

/// Writes a test of a block-based format applies through the engine (and to `want`): aligned,
/// unaligned, one byte, across `block`-sized block boundaries, the last bytes of the disk, and
/// a zeroed (unmapped) range of two blocks at `zero_at`.
pub fn write_block_pattern(
    im: &imgfs::Image,
    want: &mut [u8],
    seed: u64,
    block: u64,
    zero_at: u64,
) {
    let size = want.len() as u64;
    let writes = [
        (0, 4096),
        (1000, 3000),
        (block - 100, 300),
        (2 * block - 1, 2 * block + 2),
        (size / 2 + 77, block),
        (size - 5000, 5000),
        (7, 1),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = random_bytes(seed + i as u64, len as usize);
        im.write_at(&data, off).unwrap();
        want[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    im.write_zeroes(zero_at, 2 * block, true).unwrap();
    want[zero_at as usize..(zero_at + 2 * block) as usize].fill(0);
}

/// Power cuts (crash simulator, 30 seeds) while writing into the differencing child `child` of
/// format `fmt` whose bytes are `initial`, with the default cache and with a one-table cache (so
/// tables are also written back by eviction). Every fifth crashed image is written to `crashed`
/// and must pass each of `checks` (imgfs argument lists, the image path appended).
pub fn cut_differencing_child(
    initial: &[u8],
    child: &Path,
    fmt: &str,
    crashed: &Path,
    checks: &[&[&str]],
) {
    use imgfs::crashsim::{run_many, Workload};
    for cache_size in [imgfs::image::DEFAULT_CACHE_SIZE, 1] {
        let work = Workload {
            ops: 40,
            max_write: 64 << 10,
            cache_size,
            ..Workload::default()
        };
        let n = run_many(initial, child, fmt, 0..30, &work, |seed, cut| {
            if seed % 5 == 0 {
                std::fs::write(crashed, &cut.image).unwrap();
                for args in checks {
                    let mut args = args.to_vec();
                    args.push(crashed.to_str().unwrap());
                    let out = run(IMGFS, &args);
                    assert!(
                        out.status.success(),
                        "seed {seed}: imgfs {args:?}: {}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cache {cache_size}: {e}"));
        assert_eq!(n, 30);
    }
}
