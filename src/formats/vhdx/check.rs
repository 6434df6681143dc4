//! `check`: log state and BAT sanity; repair replays the log.

use super::bat::{Payload, SectorBitmap};
use super::map::VhdxMap;
use crate::error::Result;
use crate::format::{CheckReport, Repair};
use crate::host::HostFile;

/// Open the image (replaying a dirty log into the file only when repairing), then walk the
/// whole BAT: invalid states, blocks inside the header or metadata, past the end of the file,
/// or used twice.
pub fn check(file: HostFile, repair: Repair) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let read_only = repair == Repair::None;
    let map = VhdxMap::open(file.clone(), read_only, 4 << 20)?;
    if map.log_state != "clean" {
        r.corruptions += 1;
        r.messages.push(format!("log: {}", map.log_state));
        if !read_only {
            r.corruptions_fixed += 1;
        }
    }
    let file_len = file.len()?;
    let g = map.geo.clone();
    let mut seen = std::collections::HashSet::new();
    for idx in 0..g.bat_entries {
        let e = map.read_entry(idx)?;
        let s = e.state();
        let is_bm = g.is_bitmap_index(idx);
        let (len, used) = if is_bm {
            (
                super::header::MIB,
                e.bitmap_state() == SectorBitmap::Present,
            )
        } else {
            r.total_clusters += 1;
            let used = matches!(
                e.payload_state(),
                Payload::FullyPresent | Payload::PartiallyPresent
            );
            (g.block_size, used)
        };
        let bad_state = if is_bm {
            matches!(e.bitmap_state(), SectorBitmap::Reserved(_))
        } else {
            match e.payload_state() {
                Payload::Reserved(_) => true,
                Payload::PartiallyPresent => !g.has_parent,
                _ => false,
            }
        };
        if bad_state {
            r.corruptions += 1;
            r.messages
                .push(format!("BAT entry {idx}: invalid state {s}"));
            continue;
        }
        if !used {
            continue;
        }
        if !is_bm {
            r.allocated_clusters += 1;
        }
        let host = match map.checked_offset(idx, e, len) {
            Ok(h) => h,
            Err(err) => {
                r.corruptions += 1;
                r.messages.push(err.to_string());
                continue;
            }
        };
        if host + len > file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "BAT entry {idx}: block at {host:#x} ends past the end of the file ({file_len:#x})"
            ));
        }
        if !seen.insert(host) {
            r.corruptions += 1;
            r.messages
                .push(format!("BAT entry {idx}: block at {host:#x} is used twice"));
        }
    }
    if !read_only {
        use crate::format::BlockMap;
        map.close()?;
    }
    Ok(r)
}
