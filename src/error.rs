//! One error type for the whole crate: a small kind, what went wrong, and where (file, offset).
//! The mapping to errno lives here and nowhere else.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The host file system failed (the source io::Error says how).
    Io,
    /// On-disk structures are inconsistent or out of range.
    Corrupt,
    /// A valid image that uses something imgfs does not support (feature bit, encryption...).
    Unsupported,
    /// A caller-supplied value is wrong (offset past the end, bad option).
    InvalidInput,
    /// A write to something opened read-only.
    ReadOnly,
    /// Another process holds the image.
    Locked,
    NotFound,
    NoSpace,
    /// Refused by policy (e.g. a guest writing an image magic into a probed raw image).
    Permission,
}

#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    msg: String,
    file: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<io::Error>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            file: None,
            offset: None,
            source: None,
        }
    }
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, msg)
    }
    pub fn read_only(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, msg)
    }
    pub fn io(msg: impl Into<String>, source: io::Error) -> Self {
        let kind = match source.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::Permission,
            _ if source.raw_os_error() == Some(libc::ENOSPC) => ErrorKind::NoSpace,
            _ if source.raw_os_error() == Some(libc::EROFS) => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        Error {
            source: Some(source),
            ..Self::new(kind, msg)
        }
    }

    /// Attach the file this error concerns, unless one is already named.
    pub fn in_file(mut self, path: &Path) -> Self {
        if self.file.is_none() {
            self.file = Some(path.to_path_buf());
        }
        self
    }
    /// Attach the byte offset (in the host file) this error concerns, unless one is already set.
    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The single place where errors become errno values for the kernel.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io => self
                .source
                .as_ref()
                .and_then(|e| e.raw_os_error())
                .unwrap_or(libc::EIO),
            ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::InvalidInput => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Locked => libc::EBUSY,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Permission => libc::EPERM,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        f.write_str(&self.msg)?;
        if let Some(off) = self.offset {
            write!(f, " (at offset {off:#x})")?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// `bail!(Corrupt, "L1 table at {off:#x} past end")` style early return.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_and_offset() {
        let e = Error::corrupt("L2 entry points past end of file")
            .at(0x30000)
            .in_file(Path::new("/tmp/a.qcow2"));
        assert_eq!(
            e.to_string(),
            "/tmp/a.qcow2: L2 entry points past end of file (at offset 0x30000)"
        );
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = Error::io("read", io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(e.errno(), libc::EBADF);
    }
}
