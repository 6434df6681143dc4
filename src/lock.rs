//! Image locking compatible with QEMU's: open-file-description (OFD) byte-range locks on the
//! image file, one byte per permission, so that qemu-img/qemu-nbd/QEMU refuse to write an image
//! imgfs has open and imgfs refuses an image QEMU is writing.
//!
//! ```text
//!   byte 100 + bit   shared lock held  = "I use permission `bit`"
//!   byte 200 + bit   shared lock held  = "I do not let others use permission `bit`"
//!   bit: 0 consistent read, 1 write, 2 write unchanged, 3 resize
//! ```
//! Taking a permission conflicts with anyone holding the matching 200+bit byte; denying it
//! conflicts with anyone holding 100+bit.

use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;
use std::io;
use std::os::unix::io::RawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const PERM_WRITE_UNCHANGED: u32 = 2;
const PERM_RESIZE: u32 = 3;
const PERM_BITS: u32 = 4;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read; others may read too but not write.
    Read,
    /// Read and write; others may read but not write.
    Write,
}

impl LockMode {
    /// The lock for opening an image writable or read-only.
    pub fn for_access(writable: bool) -> LockMode {
        if writable {
            LockMode::Write
        } else {
            LockMode::Read
        }
    }

    fn perms(self) -> u32 {
        match self {
            LockMode::Read => 1 << PERM_READ,
            LockMode::Write => (1 << PERM_READ) | (1 << PERM_WRITE) | (1 << PERM_RESIZE),
        }
    }
    fn shared(self) -> u32 {
        (1 << PERM_READ) | (1 << PERM_WRITE_UNCHANGED)
    }
}

/// How long a conflicting lock may take to go away: a daemon killed with SIGKILL keeps its locks
/// until its last thread has finished the system call it was in.
const LOCK_RETRIES: u32 = 5;
const LOCK_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Lock `file` for `mode`, or fail with `ErrorKind::Locked` naming the conflicting permission.
/// The locks live as long as the file's descriptor. In-memory files are not locked.
pub fn acquire(file: &HostFile, mode: LockMode) -> Result<()> {
    let Some(fd) = file.raw_fd() else {
        return Ok(());
    };
    let mut attempt = 0;
    loop {
        match try_acquire(file, fd, mode) {
            Err(e) if e.kind() == ErrorKind::Locked && attempt < LOCK_RETRIES => {
                attempt += 1;
                std::thread::sleep(LOCK_RETRY_DELAY);
            }
            other => return other,
        }
    }
}

fn try_acquire(file: &HostFile, fd: RawFd, mode: LockMode) -> Result<()> {
    let locked = |why: String| {
        Error::new(
            ErrorKind::Locked,
            format!("{why}: is another process (imgfs, QEMU) using the image?"),
        )
        .in_file(file.path())
    };
    let io_err = |e: io::Error| Error::io("cannot lock", e).in_file(file.path());
    let (perms, shared) = (mode.perms(), mode.shared());
    for bit in 0..PERM_BITS {
        if perms & (1 << bit) != 0
            && is_locked_by_other(fd, SHARED_BASE + bit as i64).map_err(io_err)?
        {
            return Err(locked(format!(
                "cannot get \"{}\" lock",
                PERM_NAMES[bit as usize]
            )));
        }
        if shared & (1 << bit) == 0
            && is_locked_by_other(fd, PERM_BASE + bit as i64).map_err(io_err)?
        {
            return Err(locked(format!(
                "cannot get shared \"{}\" lock",
                PERM_NAMES[bit as usize]
            )));
        }
    }
    for bit in 0..PERM_BITS {
        if perms & (1 << bit) != 0 {
            set_read_lock(fd, PERM_BASE + bit as i64).map_err(io_err)?;
        }
        if shared & (1 << bit) == 0 {
            set_read_lock(fd, SHARED_BASE + bit as i64).map_err(io_err)?;
        }
    }
    Ok(())
}

/// Drop every OFD lock held through `fd`'s open file description (also for copies of it that
/// forked children still hold). Errors are ignored: the descriptor is about to be closed.
pub fn release_all(fd: RawFd) {
    let mut fl = flock_at(0, libc::F_UNLCK);
    fl.l_len = 0; // to the end of the file
                  // SAFETY: fcntl with a descriptor the caller owns and a pointer to a live flock struct.
    unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
}

fn flock_at(start: i64, ty: i32) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_read_lock(fd: RawFd, byte: i64) -> io::Result<()> {
    let fl = flock_at(byte, libc::F_RDLCK);
    // SAFETY: fcntl with a valid descriptor and a pointer to a live flock struct.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "lock held by another process",
            ));
        }
        return Err(e);
    }
    Ok(())
}

fn is_locked_by_other(fd: RawFd, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK);
    // SAFETY: fcntl with a valid descriptor and a pointer to a live flock struct it may fill.
    let r = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn writer_excludes_writer_and_reader_but_readers_share() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let open = |w| HostFile::open(Path::new(&p), w).unwrap();
        let r1 = open(false);
        acquire(&r1, LockMode::Read).unwrap();
        let r2 = open(false);
        acquire(&r2, LockMode::Read).unwrap();
        let w = open(true);
        assert_eq!(
            acquire(&w, LockMode::Write).unwrap_err().kind(),
            ErrorKind::Locked
        );
        drop((r1, r2));
        acquire(&w, LockMode::Write).unwrap();
        let w2 = open(true);
        let e = acquire(&w2, LockMode::Write).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("another process"), "{e}");
        let r3 = open(false);
        assert_eq!(
            acquire(&r3, LockMode::Read).unwrap_err().kind(),
            ErrorKind::Locked
        );
    }

    /// A child forked while the image is open keeps a copy of the locked description until it
    /// execs or exits; closing the image must still release the lock at once.
    #[test]
    fn closing_releases_locks_that_a_forked_child_shares() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let w = HostFile::open(Path::new(&p), true).unwrap();
        acquire(&w, LockMode::Write).unwrap();
        let (rd, wr) = {
            let mut fds = [0; 2];
            // SAFETY: pipe with a valid two-element array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        // SAFETY: the child only calls async-signal-safe functions (read, _exit).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut b = 0u8;
            // SAFETY: blocking read of one byte into a live buffer, then _exit.
            unsafe {
                libc::read(rd, (&mut b as *mut u8).cast(), 1);
                libc::_exit(0)
            };
        }
        drop(w);
        let again = HostFile::open(Path::new(&p), true).unwrap();
        let r = try_acquire(&again, again.raw_fd().unwrap(), LockMode::Write);
        // SAFETY: wake the child (it holds the old description until now) and reap it.
        unsafe {
            libc::write(wr, [1u8].as_ptr().cast(), 1);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(rd);
            libc::close(wr);
        }
        r.unwrap();
    }
}
