//! `imgfs umount MOUNTPOINT`: unmount and wait until the daemon has flushed and closed every image.

use crate::daemon;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Detach even when busy (open files, loop devices); the daemon exits after the last close.
    #[arg(short, long)]
    pub lazy: bool,
    pub mountpoint: PathBuf,
}

pub fn run(args: UmountArgs) -> i32 {
    let mp = &args.mountpoint;
    let pid = match daemon_pid(mp) {
        Ok(pid) => pid,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            // The daemon is gone (killed): just remove the dead mount.
            return match daemon::unmount(mp, true) {
                Ok(()) => {
                    eprintln!(
                        "imgfs: {}: removed a stale mount (daemon was gone)",
                        mp.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("imgfs: {}: {e}", mp.display());
                    1
                }
            };
        }
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            // FUSE lets nobody but the mounting user in without allow_other, not even root.
            eprintln!(
                "imgfs: {}: mounted by another user without --allow-other; run imgfs umount as \
                 that user (or plain umount, which does not wait for the daemon)",
                mp.display()
            );
            return 1;
        }
        Err(e) => {
            eprintln!("imgfs: {}: not an imgfs mount ({e})", mp.display());
            return 1;
        }
    };
    if let Err(e) = unmount_retrying(mp, args.lazy) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            eprintln!(
                "imgfs: {}: busy (open files or loop devices); close them or use --lazy",
                mp.display()
            );
        } else {
            eprintln!("imgfs: {}: cannot unmount: {e}", mp.display());
        }
        return 1;
    }
    if args.lazy {
        return 0;
    }
    match daemon::wait_for_exit(pid) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imgfs: waiting for daemon {pid}: {e}");
            1
        }
    }
}

/// umount2, retrying a busy mount for up to a second: a file closed a moment ago, or inherited
/// for an instant by a child between fork and exec, keeps the mount busy only briefly.
fn unmount_retrying(mp: &std::path::Path, lazy: bool) -> std::io::Result<()> {
    for _ in 0..20 {
        match daemon::unmount(mp, lazy) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
    daemon::unmount(mp, lazy)
}

/// The daemon publishes its pid as the `user.imgfs.pid` xattr of the mount's root.
fn daemon_pid(mp: &std::path::Path) -> std::io::Result<i32> {
    let raw = super::read_xattr(mp, "user.imgfs.pid")?;
    std::str::from_utf8(&raw)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
}
