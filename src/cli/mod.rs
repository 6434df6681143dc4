//! One module per subcommand. Each returns the process exit code.

pub mod check;
pub mod create;
pub mod helper;
pub mod info;
pub mod mount;
pub mod resize;
pub mod snapshot;
pub mod stats;
pub mod umount;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// getxattr(2) of a path, growing the buffer as needed.
pub fn read_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let inval = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| inval())?;
    let n = CString::new(name).map_err(|_| inval())?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: getxattr with NUL-terminated strings and a buffer of the length we pass.
        let r =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || buf.len() > (64 << 20) {
            return Err(e);
        }
        buf.resize(buf.len() * 4, 0);
    }
}

pub use crate::options::parse_size;

/// 1.5 GiB style rendering.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(1536 << 20), "1.500 GiB");
    }
}
