//! `imgfs check [-r leaks|all] [--json] [-f FMT] IMAGE` with qemu-img check's exit codes:
//! 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format cannot be checked.

use crate::error::ErrorKind;
use crate::formats;
use crate::host::HostFile;
use crate::image::{CheckReport, Repair};
use crate::lock::{self, LockMode};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Repair: "leaks" frees leaked clusters, "all" also fixes refcount errors / replays logs.
    #[arg(short = 'r', long = "repair", value_parser = ["leaks", "all"])]
    pub repair: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image format; probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    pub image: PathBuf,
}

pub fn run(args: CheckArgs) -> i32 {
    let repair = match args.repair.as_deref() {
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        _ => Repair::None,
    };
    let writable = repair != Repair::None;
    let _bar = crate::progress::Bar::start(if writable { "repairing" } else { "checking" });
    let result = HostFile::open(&args.image, writable).and_then(|file| {
        lock::acquire(&file, LockMode::for_access(writable))?;
        let format = match &args.format {
            Some(f) => formats::by_name(f)?,
            None => formats::detect_file(&file)?,
        };
        format
            .check(file, repair)
            .map_err(|e| e.in_file(&args.image))
    });
    match result {
        Ok(report) => {
            if args.json {
                let v = serde_json::json!({
                    "filename": args.image.display().to_string(),
                    "check_errors": report.corruptions - report.corruptions_fixed,
                    "leaks": report.leaks - report.leaks_fixed,
                    "corruptions_fixed": report.corruptions_fixed,
                    "leaks_fixed": report.leaks_fixed,
                    "allocated_clusters": report.allocated_clusters,
                    "total_clusters": report.total_clusters,
                    "messages": report.messages,
                    "exit_code": report.exit_code(),
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print_text(&report);
            }
            report.exit_code()
        }
        Err(e) if e.kind() == ErrorKind::Unsupported && e.message().starts_with("checking") => {
            eprintln!("imgfs: {e}");
            63
        }
        Err(e) => {
            eprintln!("imgfs: {e}");
            1
        }
    }
}

fn print_text(r: &CheckReport) {
    for m in &r.messages {
        println!("{m}");
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    let corrupt = r.corruptions - r.corruptions_fixed;
    let leaks = r.leaks - r.leaks_fixed;
    if corrupt > 0 {
        println!(
            "\n{corrupt} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."
        );
    }
    if leaks > 0 {
        println!(
            "\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."
        );
    }
    if corrupt == 0 && leaks == 0 {
        println!("No errors were found on the image.");
    }
    if r.total_clusters > 0 {
        println!(
            "{}/{} = {:.2}% allocated",
            r.allocated_clusters,
            r.total_clusters,
            100.0 * r.allocated_clusters as f64 / r.total_clusters as f64
        );
    }
}
