//! `imgfs info [--json] IMAGE`

use crate::cli::human_size;
use crate::image::{Image, OpenOpts};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image format; probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Allow backing files outside the image's directory.
    #[arg(long)]
    pub allow_backing_outside: bool,
    /// Where to look for the parent of a VirtualBox differencing VDI (named only by UUID).
    #[arg(long, value_name = "DIR")]
    pub backing_dir: Option<PathBuf>,
    pub image: PathBuf,
}

pub fn run(args: InfoArgs) -> i32 {
    // Read-only and without locks: info must work on an image that is mounted.
    let opts = OpenOpts {
        read_only: true,
        lock: false,
        format: args.format.clone(),
        allow_backing_outside: args.allow_backing_outside,
        backing_dir: args.backing_dir.clone(),
        ..OpenOpts::default()
    };
    let imgs = match Image::open_all(&args.image, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("imgfs: {e}");
            return 1;
        }
    };
    if imgs.len() > 1 || imgs.first().is_some_and(|i| i.path() != args.image) {
        // An OVA appliance: its disks.
        let disks: Vec<Value> = imgs.iter().map(describe).collect();
        if args.json {
            let v = json!({"filename": args.image.display().to_string(), "format": "ova", "disks": disks});
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            println!(
                "appliance: {} (OVA, {} disks)",
                args.image.display(),
                disks.len()
            );
            for d in &disks {
                println!();
                print_text(d);
            }
        }
        return 0;
    }
    let v = describe(&imgs[0]);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print_text(&v);
    }
    0
}

/// JSON description of an image and its backing chain (stable keys, documented in docs/info.md).
pub fn describe(img: &Image) -> Value {
    let info = img.info();
    let backing_chain: Vec<Value> = std::iter::successors(img.backing().cloned(), |b| b.backing().cloned())
        .map(|b| json!({"filename": b.path().display().to_string(), "format": b.format(), "virtual_size": b.size()}))
        .collect();
    json!({
        "filename": img.path().display().to_string(),
        "format": info.format,
        "virtual_size": info.virtual_size,
        "cluster_size": info.cluster_size,
        "disk_size": img.host_allocated(),
        "file_length": img.host_len(),
        "backing_file": info.backing.as_ref().map(|b| b.name.clone()),
        "backing_format": info.backing.as_ref().and_then(|b| b.format.clone()),
        "backing_chain": backing_chain,
        "snapshots": img.snapshots(),
        "partitions": crate::views::scan_image(img),
        "format_specific": info.details,
    })
}

fn print_text(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!("image: {}", s("filename"));
    println!("file format: {}", s("format"));
    println!(
        "virtual size: {} ({} bytes)",
        human_size(n("virtual_size")),
        n("virtual_size")
    );
    println!("disk size: {}", human_size(n("disk_size")));
    println!("cluster_size: {}", n("cluster_size"));
    if let Some(b) = v["backing_file"].as_str() {
        println!("backing file: {b}");
        if let Some(f) = v["backing_format"].as_str() {
            println!("backing file format: {f}");
        }
    }
    if let Some(chain) = v["backing_chain"].as_array().filter(|c| !c.is_empty()) {
        println!("backing chain:");
        for b in chain {
            println!(
                "    {} ({}, {})",
                b["filename"].as_str().unwrap_or(""),
                b["format"].as_str().unwrap_or(""),
                human_size(b["virtual_size"].as_u64().unwrap_or(0))
            );
        }
    }
    if let Some(snaps) = v["snapshots"].as_array().filter(|s| !s.is_empty()) {
        println!("Snapshot list:");
        println!("{:<4} {:<20} {:>12}", "ID", "TAG", "VM SIZE");
        for sn in snaps {
            println!(
                "{:<4} {:<20} {:>12}",
                sn["id"].as_str().unwrap_or(""),
                sn["name"].as_str().unwrap_or(""),
                human_size(sn["vm_state_size"].as_u64().unwrap_or(0))
            );
        }
    }
    print_partitions(&v["partitions"]);
    if let Some(m) = v["format_specific"].as_object().filter(|m| !m.is_empty()) {
        println!("Format specific information:");
        for (k, val) in m {
            let shown = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("    {k}: {shown}");
        }
    }
}

fn print_partitions(t: &Value) {
    let Some(parts) = t["partitions"].as_array() else {
        return;
    };
    println!(
        "partition table: {} (disk id {}, {}-byte sectors)",
        t["scheme"].as_str().unwrap_or(""),
        t["disk_id"].as_str().unwrap_or(""),
        t["sector_size"].as_u64().unwrap_or(0)
    );
    println!(
        "{:<4} {:>14} {:>10} {:<36} NAME",
        "NUM", "START", "SIZE", "TYPE"
    );
    for p in parts {
        println!(
            "{:<4} {:>14} {:>10} {:<36} {}",
            p["number"].as_u64().unwrap_or(0),
            p["start"].as_u64().unwrap_or(0),
            human_size(p["len"].as_u64().unwrap_or(0)),
            p["type_id"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or("")
        );
    }
    for w in t["warnings"].as_array().into_iter().flatten() {
        println!("    warning: {}", w.as_str().unwrap_or(""));
    }
}
