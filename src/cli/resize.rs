//! `imgfs resize [--shrink] [-f FMT] IMAGE [+|-]SIZE` with qemu-img resize's conventions: a
//! relative size changes the current one, shrinking needs `--shrink`, "Image resized." on
//! success, exit 0 on success and 1 on any error. A mounted image is refused by its lock.

use crate::error::{Error, Result};
use crate::image::{Image, OpenOpts};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// Allow a size smaller than the current one (data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// Image format; probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Follow backing files outside the image's directory.
    #[arg(long)]
    pub allow_backing_outside: bool,
    pub image: PathBuf,
    /// New size (64K, 20G...), or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// What the SIZE argument asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

pub fn parse_size_arg(s: &str) -> std::result::Result<SizeArg, String> {
    if let Some(r) = s.strip_prefix('+') {
        Ok(SizeArg::Grow(crate::options::parse_size(r)?))
    } else if let Some(r) = s.strip_prefix('-') {
        Ok(SizeArg::Shrink(crate::options::parse_size(r)?))
    } else {
        Ok(SizeArg::Absolute(crate::options::parse_size(s)?))
    }
}

/// The size `arg` asks for when the image is `current` bytes.
pub fn target_size(current: u64, arg: SizeArg) -> Result<u64> {
    let total = match arg {
        SizeArg::Absolute(n) => Some(n),
        SizeArg::Grow(n) => current.checked_add(n),
        SizeArg::Shrink(n) => current.checked_sub(n),
    };
    match total {
        Some(n) if n > 0 => Ok(n),
        Some(_) | None if matches!(arg, SizeArg::Grow(_)) => {
            Err(Error::invalid("new image size is too large"))
        }
        _ => Err(Error::invalid("new image size must be positive")),
    }
}

pub fn run(args: ResizeArgs) -> i32 {
    match resize(&args) {
        Ok(()) => {
            println!("Image resized.");
            0
        }
        Err(e) => {
            eprintln!("imgfs: {e}");
            1
        }
    }
}

fn resize(args: &ResizeArgs) -> Result<()> {
    let arg = parse_size_arg(&args.size).map_err(Error::invalid)?;
    let opts = OpenOpts {
        read_only: false,
        format: args.format.clone(),
        allow_backing_outside: args.allow_backing_outside,
        ..OpenOpts::default()
    };
    let image = Image::open(&args.image, &opts)?;
    let current = image.size();
    let new = target_size(current, arg).map_err(|e| e.in_file(&args.image))?;
    if new < current {
        if !args.shrink {
            return Err(Error::invalid(format!(
                "use the --shrink option to shrink the disk from {current} to {new} bytes"
            ))
            .in_file(&args.image));
        }
        if image.can_shrink() {
            eprintln!(
                "imgfs: warning: shrinking deletes all data past the new end of the disk ({new} \
                 bytes)"
            );
        }
        image.resize_allow_shrink(new)?;
    } else {
        image.resize(new)?;
    }
    image.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_arguments_follow_qemu_img() {
        assert_eq!(parse_size_arg("20G"), Ok(SizeArg::Absolute(20 << 30)));
        assert_eq!(parse_size_arg("+1M"), Ok(SizeArg::Grow(1 << 20)));
        assert_eq!(parse_size_arg("-512"), Ok(SizeArg::Shrink(512)));
        assert!(parse_size_arg("abc").is_err());
        assert_eq!(
            target_size(4 << 20, SizeArg::Grow(1 << 20)).unwrap(),
            5 << 20
        );
        assert_eq!(
            target_size(4 << 20, SizeArg::Shrink(1 << 20)).unwrap(),
            3 << 20
        );
        assert!(target_size(4 << 20, SizeArg::Shrink(4 << 20)).is_err());
        assert!(target_size(4 << 20, SizeArg::Absolute(0)).is_err());
        assert!(target_size(u64::MAX, SizeArg::Grow(1)).is_err());
    }
}
