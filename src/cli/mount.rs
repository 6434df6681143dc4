//! `imgfs mount [opts] IMAGE... MOUNTPOINT`

use crate::daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::fuse::transport::{self, Transport};
use crate::fuse::{ImgFs, Ownership};
use crate::image::{Image, OpenOpts, DEFAULT_CACHE_SIZE};
use clap::Args;
use fuser::{Config, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug, Clone)]
#[command(
    override_usage = "imgfs mount [OPTIONS] IMAGE... MOUNTPOINT",
    after_help = "Examples:\n  imgfs mount disk.qcow2 /mnt/img          # /mnt/img/disk.raw\n  \
imgfs mount -r /var/lib/images /mnt/all    # every image in the directory, read-only\n  \
imgfs mount -f disk.vhdx /mnt/img          # stay in the foreground, log to stderr"
)]
pub struct MountArgs {
    /// Expose the images read-only (the image files are never written).
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Image format (raw, qcow, qcow2, qed, vhdx); probed from the magic when omitted.
    #[arg(long = "format", short = 'F')]
    pub format: Option<String>,
    /// Stay in the foreground, logging to stderr (level from RUST_LOG).
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Microseconds a worker polls for the next request before it sleeps (0, the default: never).
    /// Saves the wake-up of a sleeping thread on each request of a queue-depth-1 workload (30:
    /// +15-50% 4 KiB random-write IOPS here) for at most this much CPU after each request, which
    /// costs CPU-bound loads (4 random readers on 2 cores: 5-10% fewer IOPS).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Metadata cache size per image (e.g. 4M, 64M).
    #[arg(long, value_parser = super::parse_size)]
    pub cache_size: Option<u64>,
    /// Let users other than the mounting user access the files.
    #[arg(long)]
    pub allow_other: bool,
    /// Owner (user name or number) of the exposed files; default: the image file's owner.
    #[arg(long, value_parser = parse_uid)]
    pub uid: Option<u32>,
    /// Group (name or number) of the exposed files; default: the image file's group.
    #[arg(long, value_parser = parse_gid)]
    pub gid: Option<u32>,
    /// Octal mask of permission bits taken away from the exposed files (0666) and directories
    /// (0777); default: the image file's own permission bits.
    #[arg(long, value_parser = parse_umask)]
    pub umask: Option<u32>,
    /// Allow backing / data files named by an image to lie outside the image's directory.
    #[arg(long)]
    pub allow_backing_outside: bool,
    /// Where to look for the parent of a VirtualBox differencing VDI (named only by UUID);
    /// default: the child's own directory.
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Option<PathBuf>,
    /// Let the kernel read and write raw images directly (FUSE passthrough): near-native speed,
    /// but that I/O bypasses imgfs (no statistics). Needs --format raw or --read-only.
    #[arg(long)]
    pub passthrough: bool,
    /// Do not expose partitions as `<stem>.partitions/N.raw` files.
    #[arg(long)]
    pub no_partitions: bool,
    /// How requests reach imgfs: uring (FUSE-over-io_uring), dev (/dev/fuse reads and writes),
    /// or auto (io_uring when the kernel offers it, else dev).
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "IMGFS_TRANSPORT")]
    pub transport: Transport,
    /// Image files, or directories whose image files are all exposed; then the mountpoint.
    #[arg(required = true, num_args = 2.., value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

pub fn run(args: MountArgs, raw_args: &[std::ffi::OsString]) -> i32 {
    if !args.foreground && !daemon::is_daemon_child() {
        let mut child_args = raw_args.to_vec();
        child_args.push("--foreground".into());
        return daemon::spawn_and_wait(&child_args);
    }
    match mount(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imgfs: {e}");
            1
        }
    }
}

fn mount(args: &MountArgs) -> Result<i32> {
    let (mountpoint, inputs) = args.paths.split_last().expect("clap requires 2 paths");
    daemon::clear_stale_mount(mountpoint);
    check_mountpoint(mountpoint)?;
    if args.threads == 0 || args.threads > 64 {
        return Err(Error::invalid("--threads must be between 1 and 64"));
    }
    if args.poll_us > 1000 {
        return Err(Error::invalid("--poll-us must be at most 1000"));
    }
    transport::check_requested(args.transport)?;
    if args.allow_other && !daemon::is_root() && !daemon::user_allow_other() {
        return Err(Error::new(
            ErrorKind::Permission,
            "--allow-other as a user needs a line 'user_allow_other' in /etc/fuse.conf",
        ));
    }
    let opts = OpenOpts {
        read_only: args.read_only,
        format: args.format.clone(),
        cache_size: args.cache_size.unwrap_or(DEFAULT_CACHE_SIZE),
        allow_backing_outside: args.allow_backing_outside,
        backing_dir: args.backing_dir.clone(),
        ..OpenOpts::default()
    };
    let files = expand_inputs(inputs, &opts)?;
    let mut images = Vec::with_capacity(files.len());
    for img in files
        .iter()
        .map(|f| Image::open_all(f, &opts))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
    {
        log::info!(
            "{}: {} image, {} bytes{}",
            img.path().display(),
            img.format(),
            img.size(),
            if img.is_read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        images.push(Arc::new(img));
    }
    let signals = daemon::block_signals();
    let ownership = Ownership {
        uid: args.uid,
        gid: args.gid,
        umask: args.umask,
    };
    let fs = ImgFs::new(images, args.read_only, args.passthrough, ownership)
        .with_partitions(!args.no_partitions);
    let partitions = fs.partitions();
    let notifier = fs.notifier_slot();
    let dev = daemon::mount_fuse(&daemon::FuseMount {
        mountpoint,
        source: &fs_name(&files),
        read_only: args.read_only,
        allow_other: args.allow_other,
    })
    .map_err(|e| Error::io(format!("cannot mount on {}", mountpoint.display()), e))?;
    let acl = if args.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    config.io_uring = args.transport != Transport::Dev;
    config.poll_before_read =
        (args.poll_us > 0).then(|| std::time::Duration::from_micros(args.poll_us));
    let session = match fuser::Session::from_fd(fs, dev, acl, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = daemon::unmount(mountpoint, true);
            return Err(Error::io(
                format!("FUSE handshake on {} failed", mountpoint.display()),
                e,
            ));
        }
    };
    partitions.set_notifier(session.notifier());
    let used = match transport::negotiated(args.transport, session.io_uring_active()) {
        Ok(t) => t,
        Err(e) => {
            drop(session);
            let _ = daemon::unmount(mountpoint, true);
            return Err(e);
        }
    };
    let _ = notifier.set(session.notifier());
    log::info!("mounted on {} ({used} transport)", mountpoint.display());
    daemon::watch_signals(signals, mountpoint.to_path_buf());
    daemon::notify_ready();
    // Runs until unmounted; fuser then calls ImgFs::destroy, which flushes and closes images.
    let result = session.run();
    daemon::sd_notify("STOPPING=1");
    match result {
        Ok(()) => {
            log::info!("unmounted {}", mountpoint.display());
            Ok(0)
        }
        Err(e) => {
            log::error!("session ended with error: {e}");
            Ok(1)
        }
    }
}

fn parse_uid(s: &str) -> std::result::Result<u32, String> {
    parse_id(s, |name| {
        // SAFETY: getpwnam returns a pointer into static storage, or null; read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        (!pw.is_null()).then(|| unsafe { (*pw).pw_uid })
    })
}

fn parse_gid(s: &str) -> std::result::Result<u32, String> {
    parse_id(s, |name| {
        // SAFETY: getgrnam returns a pointer into static storage, or null; read at once.
        let gr = unsafe { libc::getgrnam(name.as_ptr()) };
        (!gr.is_null()).then(|| unsafe { (*gr).gr_gid })
    })
}

/// A number, or a name looked up with `lookup`.
fn parse_id(
    s: &str,
    lookup: impl Fn(&std::ffi::CStr) -> Option<u32>,
) -> std::result::Result<u32, String> {
    if let Ok(n) = s.parse() {
        return Ok(n);
    }
    std::ffi::CString::new(s)
        .ok()
        .and_then(|c| lookup(&c))
        .ok_or_else(|| format!("no such user or group {s:?}"))
}

fn parse_umask(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("umask {s:?} is not an octal mask like 022"))
}

fn check_mountpoint(mp: &Path) -> Result<()> {
    let meta = std::fs::metadata(mp).map_err(|e| Error::io("mountpoint", e).in_file(mp))?;
    if !meta.is_dir() {
        return Err(Error::invalid("mountpoint is not a directory").in_file(mp));
    }
    Ok(())
}

fn fs_name(files: &[PathBuf]) -> String {
    // Shown as the mount's source; mount_fuse makes it safe for the kernel's option string.
    files
        .first()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Files named directly, plus the image files directly inside named directories. Inside a
/// directory, files that are the backing file of another image there are not exposed, and raw
/// files count only with an image-like extension.
pub fn expand_inputs(inputs: &[PathBuf], opts: &OpenOpts) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta =
            std::fs::metadata(input).map_err(|e| Error::io("cannot open", e).in_file(input))?;
        if !meta.is_dir() {
            files.push(canonical(input)?);
            continue;
        }
        files.extend(images_in_dir(input, opts)?);
    }
    if files.is_empty() {
        return Err(Error::new(ErrorKind::NotFound, "no image files to mount"));
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    Ok(files)
}

fn canonical(p: &Path) -> Result<PathBuf> {
    p.canonicalize()
        .map_err(|e| Error::io("cannot open", e).in_file(p))
}

const RAW_EXTENSIONS: &[&str] = &["img", "raw", "iso", "bin"];

fn images_in_dir(dir: &Path, opts: &OpenOpts) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("cannot list", e).in_file(dir))?;
    let mut candidates = Vec::new();
    for entry in rd.flatten() {
        let p = entry.path();
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        candidates.push(canonical(&p)?);
    }
    candidates.sort();
    // Look at each without locking to learn formats and backing chains.
    let peek = OpenOpts {
        read_only: true,
        lock: false,
        ..opts.clone()
    };
    let mut images = Vec::new();
    let mut backing_files = std::collections::HashSet::new();
    for c in candidates {
        let Ok(img) = Image::open(&c, &peek) else {
            log::warn!("{}: not exposed (cannot open as an image)", c.display());
            continue;
        };
        let ext = c.extension().map(|e| e.to_string_lossy().to_lowercase());
        if img.format() == "raw" && !ext.is_some_and(|e| RAW_EXTENSIONS.contains(&e.as_str())) {
            continue;
        }
        let mut b = img.backing().cloned();
        while let Some(bi) = b {
            backing_files.insert(bi.path().to_path_buf());
            b = bi.backing().cloned();
        }
        images.push(c);
    }
    images.retain(|p| !backing_files.contains(p));
    Ok(images)
}
