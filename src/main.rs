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
    /// Create an image (qemu-img create conventions).
    Create(cli::create::CreateArgs),
    /// Check (and repair) an image's metadata; exit codes as qemu-img check.
    Check(cli::check::CheckArgs),
    /// List internal snapshots.
    Snapshot(cli::snapshot::SnapshotArgs),
    /// Show per-image statistics of a mount.
    Stats(cli::stats::StatsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

fn main() {
    imgfs::logging::init();
    let mut raw_args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if cli::helper::is_helper_name(&argv0) {
        match cli::helper::translate(&raw_args) {
            Ok(cli::helper::HelperCall::Mount(args)) => raw_args = args,
            Ok(cli::helper::HelperCall::Fake) => std::process::exit(0),
            Err(e) => {
                eprintln!("mount.fuse.imgfs: {e}");
                std::process::exit(1);
            }
        }
    }
    let cli = Cli::parse_from(std::iter::once("imgfs".into()).chain(raw_args.iter().cloned()));
    if !matches!(cli.cmd, Cmd::Mount(_) | Cmd::Umount(_)) {
        // Commands that print end quietly when their reader goes away (`imgfs info X | head`),
        // as other command-line tools do, instead of panicking on the failed write. The daemon
        // keeps SIGPIPE ignored.
        // SAFETY: setting a signal's disposition to the default before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let code = match cli.cmd {
        Cmd::Mount(a) => cli::mount::run(a, &raw_args),
        Cmd::Umount(a) => cli::umount::run(a),
        Cmd::Info(a) => cli::info::run(a),
        Cmd::Create(a) => cli::create::run(a),
        Cmd::Check(a) => cli::check::run(a),
        Cmd::Snapshot(a) => cli::snapshot::run(a),
        Cmd::Stats(a) => cli::stats::run(a),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "imgfs", &mut std::io::stdout());
            0
        }
    };
    std::process::exit(code);
}
