//! Which channel FUSE requests travel on: FUSE-over-io_uring (ring entries registered with the
//! kernel, served by `fuser`'s ring threads, see vendor/fuser/src/uring.rs) or the classic
//! `/dev/fuse` read/write loop. `imgfs mount --transport auto|uring|dev`.

use crate::error::{Error, Result};
use std::sync::OnceLock;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// io_uring when the kernel offers it, else /dev/fuse.
    Auto,
    /// FUSE-over-io_uring; mounting fails when the kernel does not offer it.
    Uring,
    /// The classic /dev/fuse read/write loop.
    Dev,
}

/// The kernel's switch for FUSE-over-io_uring (Linux 6.14+; off by default, root may turn it on).
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Why FUSE-over-io_uring cannot be used on this machine, or `None` when it can.
pub fn uring_unavailable() -> Option<String> {
    match std::fs::read_to_string(ENABLE_PARAM) {
        Err(_) => Some("this kernel has no FUSE-over-io_uring (needs Linux 6.14+)".into()),
        Ok(s) if s.trim() != "Y" => Some(format!(
            "FUSE-over-io_uring is off in the kernel ({ENABLE_PARAM} is {}; as root: echo Y > {ENABLE_PARAM})",
            s.trim()
        )),
        Ok(_) => match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            Ok(s) if s.trim() == "2" => {
                Some("io_uring is disabled (sysctl kernel.io_uring_disabled = 2)".into())
            }
            _ => None,
        },
    }
}

/// Before mounting: `--transport uring` on a machine without it fails with one clear line.
pub fn check_requested(t: Transport) -> Result<()> {
    match (t, uring_unavailable()) {
        (Transport::Uring, Some(why)) => Err(Error::invalid(format!("--transport uring: {why}"))),
        _ => Ok(()),
    }
}

static ACTIVE: OnceLock<&'static str> = OnceLock::new();

/// After FUSE_INIT: record what was negotiated (shown by `imgfs stats`); an error when `uring`
/// was required and the kernel did not take it.
pub fn negotiated(t: Transport, uring: bool) -> Result<&'static str> {
    if t == Transport::Uring && !uring {
        return Err(Error::invalid(
            "--transport uring: the kernel did not accept FUSE-over-io_uring in FUSE_INIT",
        ));
    }
    let name = if uring { "io_uring" } else { "dev" };
    let _ = ACTIVE.set(name);
    Ok(name)
}

/// The transport this process serves its mount with ("io_uring" or "dev"; "none" before).
pub fn active() -> &'static str {
    ACTIVE.get().copied().unwrap_or("none")
}
