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
    // The daemon logs its progress on stderr until it is ready; relay only what went wrong.
    let errors: String = err_reader
        .join()
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            !["INFO", "DEBUG", "TRACE"]
                .iter()
                .any(|lv| l.starts_with(&format!("imgfs: {lv}: ")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
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

/// Are we root? Root mounts and unmounts with the system calls; anybody else goes through the
/// setuid helper `fusermount3` (package fuse3), as sshfs and qemu-storage-daemon do.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

const FUSERMOUNT: &str = "fusermount3";

/// Run `fusermount3 ARGS`, its stdout/stderr captured, `comm` (if any) passed down as
/// `_FUSE_COMMFD`. Returns the child so the caller can talk over `comm` before waiting.
fn spawn_fusermount(
    args: &[&std::ffi::OsStr],
    comm: Option<i32>,
) -> std::io::Result<std::process::Child> {
    let mut cmd = Command::new(FUSERMOUNT);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(fd) = comm {
        cmd.env("_FUSE_COMMFD", fd.to_string());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on the helper's end.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            std::io::Error::new(
                e.kind(),
                "fusermount3 not found: install the fuse3 package (or mount as root)",
            )
        } else {
            e
        }
    })
}

/// Wait for fusermount3; its last stderr line becomes the error (EBUSY when it says busy).
fn finish_fusermount(child: std::process::Child) -> std::io::Result<()> {
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    let msg = String::from_utf8_lossy(&out.stderr);
    let msg = msg
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("failed")
        .trim();
    if msg.contains("busy") {
        return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
    }
    Err(std::io::Error::other(msg.to_string()))
}

/// Does /etc/fuse.conf let users mount with allow_other?
pub fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|s| s.lines().any(|l| l.trim() == "user_allow_other"))
}

/// umount2(2) as root, `fusermount3 -u` otherwise; `lazy` detaches a busy mount.
pub fn unmount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    if !is_root() {
        let mut args: Vec<&std::ffi::OsStr> = vec!["-u".as_ref()];
        if lazy {
            args.push("-z".as_ref());
        }
        args.extend(["--".as_ref(), mountpoint.as_os_str()]);
        return finish_fusermount(spawn_fusermount(&args, None)?);
    }
    let c = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 with a NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A FUSE mount whose daemon died answers ENOTCONN: detach it so the mountpoint can be reused.
pub fn clear_stale_mount(mountpoint: &Path) -> bool {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
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

/// Mount with type `fuse.imgfs` (so `findmnt` shows what it is and the image it serves):
/// directly as root, through fusermount3 otherwise. Returns the connection fd for
/// `fuser::Session::from_fd`.
pub fn mount_fuse(m: &FuseMount) -> std::io::Result<std::os::fd::OwnedFd> {
    if is_root() {
        mount_direct(m)
    } else {
        mount_fusermount(m)
    }
}

/// fusermount3's protocol: it opens /dev/fuse, mounts it (checking the caller may), and sends
/// the descriptor back over the socket named by `_FUSE_COMMFD` (SCM_RIGHTS).
fn mount_fusermount(m: &FuseMount) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut opts = format!(
        "fsname={},subtype=imgfs,default_permissions,max_read={},nosuid,nodev",
        m.source.replace([',', '\\'], "_"),
        crate::fuse::MAX_READ
    );
    opts.push_str(if m.read_only { ",ro" } else { ",rw" });
    if m.allow_other {
        opts.push_str(",allow_other");
    }
    let mut pair = [0i32; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let args: [&std::ffi::OsStr; 4] = [
        "-o".as_ref(),
        opts.as_ref(),
        "--".as_ref(),
        m.mountpoint.as_os_str(),
    ];
    let child = spawn_fusermount(&args, Some(theirs.as_raw_fd()))?;
    drop(theirs);
    let received = receive_fd(ours.as_raw_fd());
    finish_fusermount(child)?;
    received?.ok_or_else(|| std::io::Error::other("fusermount3 sent no /dev/fuse descriptor"))
}

/// Receive one descriptor sent with SCM_RIGHTS; None when the peer closed without sending one.
fn receive_fd(sock: i32) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one int, aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer in it refers to the locals above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as _;
    let n = loop {
        // SAFETY: recvmsg into the buffers described by msg.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n == 0 {
        return Ok(None);
    }
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        Ok(Some(std::os::fd::OwnedFd::from_raw_fd(fd)))
    }
}

fn mount_direct(m: &FuseMount) -> std::io::Result<std::os::fd::OwnedFd> {
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
