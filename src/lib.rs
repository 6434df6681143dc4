//! imgfs: expose virtual-machine disk images as flat raw files over FUSE.

pub mod cache;
pub mod crashsim;
pub mod error;
pub mod format;
pub mod formats;
pub mod host;
pub mod image;
pub mod lock;
pub mod options;
pub mod policy;
pub mod views;

pub use error::{Error, ErrorKind, Result};
pub use image::{Image, OpenOpts};
pub mod cli;
pub mod daemon;
pub mod fuse;
pub mod logging;
pub mod progress;
pub mod stats;
