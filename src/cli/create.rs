//! `imgfs create -f FMT [-o key=val,...] [-b BACKING [-F BACKING_FMT]] IMAGE [SIZE]`

use crate::error::{Error, Result};
use crate::formats;
use crate::host::HostFile;
use crate::image::{BackingRef, CreateOpts, Image, OpenOpts};
use crate::lock::{self, LockMode};
use clap::Args;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Format of the new image (raw, qcow, qcow2, qed, vhdx).
    #[arg(short = 'f', long = "format", default_value = "raw")]
    pub format: String,
    /// Format options, comma-separated key=value (may be repeated), e.g. cluster_size=64K,compat=1.1.
    #[arg(short = 'o', long = "options")]
    pub options: Vec<String>,
    /// Backing file, stored in the image as given (relative names are relative to the image).
    #[arg(short = 'b', long = "backing")]
    pub backing: Option<String>,
    /// Format of the backing file; probed when omitted.
    #[arg(short = 'F', long = "backing-format")]
    pub backing_format: Option<String>,
    /// Allow a backing file outside the new image's directory.
    #[arg(long)]
    pub allow_backing_outside: bool,
    pub image: PathBuf,
    /// Virtual size (K/M/G/T suffixes); taken from the backing file when omitted.
    #[arg(value_parser = super::parse_size)]
    pub size: Option<u64>,
}

pub fn run(args: CreateArgs) -> i32 {
    match create(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imgfs: {e}");
            1
        }
    }
}

/// Parse `-o a=1,b=2 -o c=3` into a map; `key` alone means `key=on`.
pub fn parse_options(list: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for part in list.iter().flat_map(|s| s.split(',')) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let (k, v) = part.split_once('=').unwrap_or((part, "on"));
        if k.is_empty() {
            return Err(Error::invalid(format!("invalid option {part:?}")));
        }
        map.insert(k.to_string(), v.to_string());
    }
    Ok(map)
}

fn create(args: &CreateArgs) -> Result<()> {
    let format = formats::by_name(&args.format)?;
    let options = parse_options(&args.options)?;
    let mut opts = CreateOpts {
        size: 0,
        backing: None,
        backing_info: None,
        options,
        progress: Default::default(),
    };
    if let Some(name) = &args.backing {
        let dir = image_dir(&args.image);
        let backing = open_backing(&dir, name, args)?;
        let mut format = args.backing_format.clone();
        if format.is_none() {
            format = Some(backing.format().to_string());
        }
        opts.size = backing.size();
        opts.backing_info = Some(backing.info());
        opts.backing = Some(BackingRef {
            name: name.clone(),
            format,
        });
    }
    if let Some(size) = args.size {
        opts.size = size;
    } else if args.backing.is_none() {
        return Err(Error::invalid(
            "a size is needed (or a backing file to take it from)",
        ));
    }
    let file = open_new(&args.image)?;
    let bar = crate::progress::Bar::start("creating");
    opts.progress = bar.progress();
    if let Err(e) = format.create(&file, &opts).and_then(|()| file.sync()) {
        let _ = std::fs::remove_file(&args.image);
        return Err(e.in_file(&args.image));
    }
    Ok(())
}

fn image_dir(image: &Path) -> PathBuf {
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

/// Open the backing file the way a mount will (same name resolution and policy) to learn its size.
fn open_backing(dir: &Path, name: &str, args: &CreateArgs) -> Result<Image> {
    let path = crate::policy::resolve_named_file(dir, name, args.allow_backing_outside)
        .map_err(|e| e.in_file(&args.image))?;
    let opts = OpenOpts {
        read_only: true,
        lock: false,
        format: args.backing_format.clone(),
        allow_backing_outside: args.allow_backing_outside,
        ..OpenOpts::default()
    };
    Image::open(&path, &opts)
}

/// Create or truncate `path`, but never under someone who has it open (QEMU-style lock first).
fn open_new(path: &Path) -> Result<HostFile> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot create", e).in_file(path))?;
    let file = HostFile::open(path, true)?;
    lock::acquire(&file, LockMode::Write)?;
    file.set_len(0)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_like_qemu_img() {
        let m = parse_options(&[
            "cluster_size=64K,compat=1.1".into(),
            "lazy_refcounts".into(),
        ])
        .unwrap();
        assert_eq!(m["cluster_size"], "64K");
        assert_eq!(m["compat"], "1.1");
        assert_eq!(m["lazy_refcounts"], "on");
        assert!(parse_options(&["=x".into()]).is_err());
    }
}
