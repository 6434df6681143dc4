//! `imgfs snapshot -l IMAGE`: list internal snapshots with qemu-img's columns.

use crate::cli::human_size;
use crate::image::{Image, OpenOpts};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// List the snapshots (the only action: imgfs does not create or delete snapshots).
    #[arg(short = 'l', long = "list", required = true)]
    pub list: bool,
    #[arg(long)]
    pub json: bool,
    pub image: PathBuf,
}

pub fn run(args: SnapshotArgs) -> i32 {
    let opts = OpenOpts {
        read_only: true,
        lock: false,
        ..OpenOpts::default()
    };
    let img = match Image::open(&args.image, &opts) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("imgfs: {e}");
            return 1;
        }
    };
    let snaps = img.snapshots();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&snaps).unwrap_or_default()
        );
        return 0;
    }
    if snaps.is_empty() {
        return 0;
    }
    println!("Snapshot list:");
    println!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for s in snaps {
        println!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            format_date(s.date_sec),
            format_clock(s.vm_clock_nsec),
            ""
        );
    }
    0
}

/// UTC "YYYY-MM-DD HH:MM:SS" without a date library (civil-from-days).
fn format_date(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn format_clock(ns: u64) -> String {
    let ms = ns / 1_000_000;
    let s = ms / 1000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_clocks() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_795_000_000), "2026-11-18 11:06:40");
        assert_eq!(format_clock(3_723_004_000_000), "0001:02:03.004");
    }
}
