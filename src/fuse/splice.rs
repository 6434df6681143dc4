//! Read replies spliced from the image file into the FUSE device: the kernel moves page-cache
//! page references into a per-thread pipe and copies once, into the reader's buffer, instead of
//! copying into our buffer and again out of it. Used for large reads whose bytes all sit in the
//! files of the image's chain or are zeros (`Image::read_plan`); anything else is copied.

use crate::image::ReadPiece;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Reads below this size are cheaper copied (one syscall fewer).
pub const MIN_SPLICE: usize = 64 << 10;

/// Zeros for vmsplice (the pipe is non-blocking: a plan that does not fit fails instead of
/// hanging, and the reply is copied). The pipe references these pages, so they must never change: an
/// immutable static is never written.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    /// One pipe per worker thread, made on first use; dropped after any failure (it may hold
    /// leftovers then).
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl Pipe {
    fn new(capacity: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let p = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // SAFETY: fcntl on a descriptor we own.
        let got = unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as i32) };
        if got < 0 || (got as usize) < capacity {
            return Err(io::Error::other("pipe too small for a spliced reply"));
        }
        Ok(p)
    }

    /// Put `len` bytes of `fd` at `off` into the pipe.
    fn fill_from(&self, fd: RawFd, mut off: u64, mut len: usize) -> io::Result<()> {
        while len > 0 {
            let mut o = off as libc::loff_t;
            // SAFETY: splice between descriptors we hold open; `o` outlives the call.
            let n = cvt(unsafe {
                libc::splice(
                    fd,
                    &mut o,
                    self.w.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE,
                )
            })?;
            if n == 0 {
                // End of the file: let the copy path decide between zeros and corruption.
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            off += n as u64;
            len -= n;
        }
        Ok(())
    }

    /// Put `bytes` into the pipe by reference (they must stay unchanged until consumed).
    fn gift(&self, mut bytes: &'static [u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let iov = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            // SAFETY: the iovec points into a static that is never written.
            let n = cvt(unsafe { libc::vmsplice(self.w.as_raw_fd(), &iov, 1, 0) })?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn zeros(&self, mut len: usize) -> io::Result<()> {
        while len > 0 {
            let n = len.min(ZEROS.len());
            self.gift(&ZEROS[..n])?;
            len -= n;
        }
        Ok(())
    }
}

/// Write a complete FUSE read reply (header + the planned bytes) to `dev` through the thread's
/// pipe. On error nothing reached the device (a device write is all or nothing), so the caller
/// can still reply by copying.
pub fn reply(dev: BorrowedFd<'_>, unique: u64, plan: &[ReadPiece], len: usize) -> io::Result<()> {
    const HEADER: usize = 16;
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if len > super::MAX_READ as usize {
            return Err(io::Error::other("reply larger than the splice pipe"));
        }
        if slot.as_ref().is_none() {
            // Room for a header and MAX_READ bytes even when every page is split in two.
            *slot = Some(Pipe::new(super::MAX_READ as usize * 2 + (64 << 10))?);
        }
        let pipe = slot.as_ref().expect("pipe just made");
        let result = (|| {
            let mut header = [0u8; HEADER];
            header[..4].copy_from_slice(&((HEADER + len) as u32).to_ne_bytes());
            header[8..].copy_from_slice(&unique.to_ne_bytes());
            // SAFETY: write from a live stack buffer into our pipe.
            let n =
                cvt(unsafe { libc::write(pipe.w.as_raw_fd(), header.as_ptr().cast(), HEADER) })?;
            if n != HEADER {
                return Err(io::Error::other("short write of a reply header"));
            }
            for p in plan {
                match *p {
                    ReadPiece::Host { fd, off, len } => pipe.fill_from(fd, off, len)?,
                    ReadPiece::Zero(len) => pipe.zeros(len)?,
                }
            }
            // SAFETY: splice from our pipe into the FUSE device we were handed.
            let n = cvt(unsafe {
                libc::splice(
                    pipe.r.as_raw_fd(),
                    std::ptr::null_mut(),
                    dev.as_raw_fd(),
                    std::ptr::null_mut(),
                    HEADER + len,
                    libc::SPLICE_F_MOVE,
                )
            })?;
            if n != HEADER + len {
                return Err(io::Error::other("short splice into the FUSE device"));
            }
            Ok(())
        })();
        if result.is_err() {
            *slot = None;
        }
        result
    })
}
