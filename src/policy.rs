//! The safety policy for file names found inside image headers (backing files, data files).

use crate::error::{Error, ErrorKind, Result};
use std::path::{Path, PathBuf};

/// Resolve a file name found in an image header (backing file, data file) under the safety
/// policy: a plain local path, relative names taken from the image's directory, and (unless
/// allowed) no escape from that directory.
pub fn resolve_named_file(dir: &Path, name: &str, allow_outside: bool) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::invalid("empty file name in image header"));
    }
    let is_protocol = name
        .split_once(':')
        .is_some_and(|(p, _)| !p.is_empty() && !p.contains('/'));
    if is_protocol {
        return Err(Error::new(
            ErrorKind::Permission,
            format!("file name {name:?} in image header is not a plain local path; refused"),
        ));
    }
    let p = Path::new(name);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    let resolved = joined.canonicalize().map_err(|e| {
        Error::io(
            format!("cannot open file {name:?} named in image header"),
            e,
        )
    })?;
    if !allow_outside && !resolved.starts_with(dir) {
        return Err(Error::new(
            ErrorKind::Permission,
            format!(
                "file {name:?} named in image header lies outside the image's directory {}; \
                 pass --allow-backing-outside to permit it",
                dir.display()
            ),
        ));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_protocols_and_escapes() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().canonicalize().unwrap();
        std::fs::write(dir.join("base.img"), b"x").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/b2.img"), b"x").unwrap();
        assert_eq!(
            resolve_named_file(&dir, "base.img", false).unwrap(),
            dir.join("base.img")
        );
        assert!(resolve_named_file(&dir, "sub/b2.img", false).is_ok());
        let abs = dir.join("base.img");
        assert!(resolve_named_file(&dir, abs.to_str().unwrap(), false).is_ok());
        for bad in ["json:{\"file\":1}", "nbd://host/x", "http:x"] {
            let e = resolve_named_file(&dir, bad, false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Permission, "{bad}");
        }
        let e = resolve_named_file(&dir.join("sub"), "../base.img", false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permission);
        assert!(resolve_named_file(&dir.join("sub"), "../base.img", true).is_ok());
        assert_eq!(
            resolve_named_file(&dir, "missing.img", false)
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
    }
}
