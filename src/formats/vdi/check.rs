//! `imgfs check [-r] -f vdi`: block map entries past the image's blocks or the file, blocks
//! used twice, and the header's allocated-block count. Repair unmaps bad and duplicate entries
//! (they read as zeros, or from the parent) and rewrites the count.

use super::header::Header;
use super::map::{classify, Entry, FREE};
use crate::error::Result;
use crate::format::{CheckReport, Repair};
use crate::host::HostFile;

pub fn check(file: HostFile, hdr: Header, repair: Repair) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let fix = repair == Repair::All;
    let file_len = file.len()?;
    let bs = hdr.block_size as u64;
    let n = hdr.blocks_in_image as usize;
    let mut raw = vec![0u8; n * 4];
    file.read_exact_at(&mut raw, hdr.offset_bmap as u64)?;
    let mut owner: Vec<Option<usize>> = vec![None; n];
    let mut bad = vec![];
    let mut count = 0u32;
    r.total_clusters = n as u64;
    for block in 0..n {
        let e = u32::from_le_bytes(raw[block * 4..block * 4 + 4].try_into().expect("4"));
        let Entry::Block(idx) = classify(e) else {
            continue;
        };
        let end = hdr.offset_data as u64 + (idx as u64 + 1) * bs;
        if idx as usize >= n || end > file_len {
            r.corruptions += 1;
            r.messages.push(format!(
                "block map entry {block}: block index {idx} lies past the image's blocks or the \
                 end of the file"
            ));
            bad.push(block);
            continue;
        }
        if let Some(first) = owner[idx as usize] {
            r.corruptions += 1;
            r.messages.push(format!(
                "block map entry {block}: block index {idx} is also used by entry {first}"
            ));
            bad.push(block);
            continue;
        }
        owner[idx as usize] = Some(block);
        count += 1;
    }
    r.allocated_clusters = count as u64;
    let count_wrong = count != hdr.blocks_allocated;
    if count_wrong {
        r.corruptions += 1;
        r.messages.push(format!(
            "header says {} blocks allocated, the block map has {count}",
            hdr.blocks_allocated
        ));
    }
    if fix && (count_wrong || !bad.is_empty()) {
        for &b in &bad {
            file.write_all_at(&FREE.to_le_bytes(), hdr.offset_bmap as u64 + b as u64 * 4)?;
        }
        file.sync()?;
        let mut h = hdr.clone();
        h.blocks_allocated = count;
        file.write_all_at(&h.to_bytes(), 0)?;
        file.sync()?;
        r.corruptions_fixed = r.corruptions;
    }
    Ok(r)
}
