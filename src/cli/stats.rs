//! `imgfs stats [--json] MOUNTPOINT`: per-image counters read from the daemon (root xattr).

use clap::Args;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    pub json: bool,
    pub mountpoint: PathBuf,
}

pub fn run(args: StatsArgs) -> i32 {
    let raw = match super::read_xattr(&args.mountpoint, "user.imgfs.stats") {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "imgfs: {}: not an imgfs mount ({e})",
                args.mountpoint.display()
            );
            return 1;
        }
    };
    let v: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("imgfs: bad stats from daemon: {e}");
            return 1;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return 0;
    }
    for img in v.as_array().into_iter().flatten() {
        println!(
            "{} ({}, {})",
            img["name"].as_str().unwrap_or(""),
            img["format"].as_str().unwrap_or(""),
            img["state"].as_str().unwrap_or("")
        );
        if let Some(m) = img.as_object() {
            for (k, val) in m {
                if !matches!(k.as_str(), "name" | "format" | "state") {
                    let shown = val
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| val.to_string());
                    println!("    {k:<22} {shown}");
                }
            }
        }
    }
    0
}
