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

/// The first of `names` that resolves under the policy. Names that do not exist are skipped;
/// when none resolves, the first other refusal (e.g. outside the directory) is reported, or
/// that none of them exists.
pub fn resolve_first(dir: &Path, names: &[String], allow_outside: bool) -> Result<PathBuf> {
    let mut refusal = None;
    for n in names {
        match resolve_named_file(dir, n, allow_outside) {
            Ok(p) => return Ok(p),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    if let Some(e) = refusal {
        return Err(e);
    }
    if names.len() == 1 {
        return resolve_named_file(dir, &names[0], allow_outside);
    }
    Err(Error::new(
        ErrorKind::NotFound,
        format!(
            "backing file not found under any of the names the image gives: {}",
            names.join(", ")
        ),
    ))
}

/// Most files looked at when searching a directory for a parent by identity.
const MAX_SEARCH: usize = 10_000;

/// The one image in `dir` (not `child` itself) whose format identity is `id`: a parent that is
/// named only by a UUID (VirtualBox differencing VDIs). Missing or several: a clear refusal.
pub fn find_by_identity(child: &Path, dir: &Path, id: &str) -> Result<PathBuf> {
    let me = child.canonicalize().ok();
    let rd = std::fs::read_dir(dir).map_err(|e| {
        Error::io(
            format!("cannot list {} to find parent {id}", dir.display()),
            e,
        )
    })?;
    let mut found = vec![];
    for entry in rd.flatten().take(MAX_SEARCH) {
        let p = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(canon) = p.canonicalize() else {
            continue;
        };
        if Some(&canon) == me.as_ref() {
            continue;
        }
        let Ok(f) = std::fs::File::open(&canon) else {
            continue;
        };
        let mut head = vec![0u8; 4096];
        let n = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0).unwrap_or(0);
        head.truncate(n);
        if crate::formats::all()
            .iter()
            .any(|fmt| fmt.identity(&head).as_deref() == Some(id))
        {
            found.push(canon);
        }
    }
    match found.len() {
        0 => Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "parent image with UUID {id} not found in {} (pass --backing-dir DIR to look \
                 elsewhere)",
                dir.display()
            ),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(Error::invalid(format!(
            "parent UUID {id} is ambiguous: {} all carry it; move the wrong ones away or pass \
             --backing-dir",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
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
