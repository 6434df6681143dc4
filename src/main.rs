use clap::{Parser, Subcommand};
use imgfs::cli;

/// Expose VM disk images (raw, qcow, qcow2, QED, VHDX) as flat raw files over FUSE.
#[derive(Parser)]
#[command(name = "imgfs", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount images: each appears as <stem>.raw under MOUNTPOINT.
    Mount(cli::mount::MountArgs),
    /// Unmount, waiting until every image is flushed and closed.
    Umount(cli::umount::UmountArgs),
    /// Show an image's format, sizes, backing chain and state.
    Info(cli::info::InfoArgs),
}

fn main() {
    imgfs::logging::init();
    let raw_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Mount(a) => cli::mount::run(a, &raw_args),
        Cmd::Umount(a) => cli::umount::run(a),
        Cmd::Info(a) => cli::info::run(a),
    };
    std::process::exit(code);
}
