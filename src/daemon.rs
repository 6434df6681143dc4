//! Running the mount: detach into the background once the mount is ready, tell systemd, and turn
//! SIGTERM/SIGINT/SIGHUP into a clean unmount (images flushed and closed before exit).
//!
//! ```text
//!   imgfs mount ...            (parent)  spawn self --foreground, IMGFS_DAEMON_CHILD=1
//!        |  stdout pipe  <---------------  child: open images, mount, "READY\n"
//!        |  exit 0 on READY, else relay the child's one-line error and its exit code
//! ```

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const CHILD_ENV: &str = "IMGFS_DAEMON_CHILD";

pub fn is_daemon_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Parent side: start the daemon and wait until it says READY or fails. Returns the exit code.
pub fn spawn_and_wait(args: &[std::ffi::OsString]) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("imgfs: cannot find own executable: {e}");
            return 1;
        }
    };
    let mut child = match Command::new(exe)
        .args(args)
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgfs: cannot start daemon: {e}");
            return 1;
        }
    };
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped");
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() == "READY" {
        return 0;
    }
    let status = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
    let errors = err_reader.join().unwrap_or_default();
    eprint!("{errors}");
    if errors.is_empty() {
        eprintln!("imgfs: daemon exited before the mount was ready");
    }
    if status == 0 {
        1
    } else {
        status
    }
}

/// Child side, once mounted: tell the parent (and systemd) we are ready, then let go of the
/// terminal: stdio to /dev/null, logs to syslog.
pub fn notify_ready() {
    if is_daemon_child() {
        println!("READY");
        crate::logging::to_syslog();
        detach_stdio();
    }
    sd_notify("READY=1");
}

fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    use std::os::unix::io::AsRawFd;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// Send a state line to systemd's notify socket, if we run under `Type=notify`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_bytes();
    let msg = format!("{state}\nMAINPID={}", std::process::id());
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(msg.as_bytes(), &addr))
    } else {
        sock.send_to(msg.as_bytes(), Path::new(&path))
    };
    if let Err(e) = sent {
        log::warn!("sd_notify failed: {e}");
    }
}

/// Block the termination signals in this (main) thread and every thread it starts later, so
/// that only the watcher thread receives them.
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// On SIGTERM/SIGINT/SIGHUP, unmount `mountpoint`; the session loop then ends and the images
/// are closed by the caller.
pub fn watch_signals(set: libc::sigset_t, mountpoint: PathBuf) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigwait with a set built by block_signals and a local out-parameter.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            log::info!("signal {sig}: unmounting {}", mountpoint.display());
            match unmount(&mountpoint, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    log::warn!(
                        "{} is busy; detached it, exiting when the last user closes it",
                        mountpoint.display()
                    );
                    let _ = unmount(&mountpoint, true);
                }
                Err(e) => log::error!("unmount {}: {e}", mountpoint.display()),
            }
        })
        .expect("spawn signal thread");
}

/// umount2(2); `lazy` detaches a busy mount.
pub fn unmount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    let c = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an error from a FUSE mount says its daemon is gone: ENOTCONN, or, with the io_uring
/// transport, ECANCELED (a request handed to the dead daemon's ring) or ECONNABORTED (one caught
/// when the connection is aborted, which the kernel does only once the dead daemon's rings are
/// torn down, a moment after its exit). imgfs itself never answers either.
pub fn is_dead_connection(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
    )
}

/// A FUSE mount whose daemon died answers ENOTCONN: detach it so the mountpoint can be reused.
pub fn clear_stale_mount(mountpoint: &Path) -> bool {
    match std::fs::metadata(mountpoint) {
        Err(e) if is_dead_connection(&e) => {
            log::warn!("{}: removing a stale FUSE mount", mountpoint.display());
            unmount(mountpoint, true).is_ok()
        }
        _ => false,
    }
}

/// Wait until process `pid` has exited (pidfd + poll), reporting if it takes long.
pub fn wait_for_exit(pid: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(e)
        };
    }
    let mut waited = 0;
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut p, 1, 1000) };
        if r > 0 {
            break;
        }
        waited += 1;
        if waited == 5 {
            eprintln!("imgfs: waiting for the daemon (pid {pid}) to finish flushing...");
        }
    }
    // SAFETY: closing the descriptor pidfd_open gave us.
    unsafe { libc::close(fd) };
    Ok(())
}

/// How the FUSE file system is mounted.
pub struct FuseMount<'a> {
    pub mountpoint: &'a Path,
    /// Shown as the mount's source (the image path).
    pub source: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
}

/// Open /dev/fuse and mount it with type `fuse.imgfs` (so `findmnt` shows what it is and the
/// image it serves). Returns the connection fd for `fuser::Session::from_fd`.
pub fn mount_fuse(m: &FuseMount) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let dev: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let meta = std::fs::metadata(m.mountpoint)?;
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={:o},user_id={uid},group_id={gid},default_permissions,max_read={}",
        dev.as_raw_fd(),
        meta.mode() & libc::S_IFMT,
        crate::fuse::MAX_READ
    );
    if m.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if m.read_only {
        flags |= libc::MS_RDONLY;
    }
    let inval = || std::io::Error::from_raw_os_error(libc::EINVAL);
    // The kernel splits mount data on commas.
    let source = CString::new(m.source.replace(',', "_")).map_err(|_| inval())?;
    let target = CString::new(m.mountpoint.as_os_str().as_bytes()).map_err(|_| inval())?;
    let fstype = c"fuse.imgfs";
    let data = CString::new(data).map_err(|_| inval())?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev)
}
