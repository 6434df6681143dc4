//! `imgfs check [-r] -f vdi`: block map entries past the image's blocks or the file, blocks
//! used twice, and the header's allocated-block count. Repair unmaps bad and duplicate entries
//! (they read as zeros, or from the parent), moves blocks whose index lies at or past the
//! count into unused indices below it (`map::compact`), and rewrites the count.

use super::header::Header;
use super::map::{classify, compact, read_entries, Entry, FREE};
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
    // Used indices must be exactly 0..count: QEMU and VirtualBox allocate at the count.
    let above = owner
        .iter()
        .skip(count as usize)
        .filter(|o| o.is_some())
        .count();
    if above > 0 {
        r.corruptions += 1;
        r.messages.push(format!(
            "{above} block(s) use indices at or past the allocated count {count} while lower \
             indices are unused: QEMU or VirtualBox would allocate over them"
        ));
    }
    let count_wrong = count != hdr.blocks_allocated;
    if count_wrong {
        r.corruptions += 1;
        r.messages.push(format!(
            "header says {} blocks allocated, the block map has {count}",
            hdr.blocks_allocated
        ));
    }
    if fix && (count_wrong || !bad.is_empty() || above > 0) {
        let mut entries = read_entries(&file, &hdr)?;
        for &b in &bad {
            file.write_all_at(&FREE.to_le_bytes(), hdr.offset_bmap as u64 + b as u64 * 4)?;
            entries[b] = FREE;
        }
        file.sync()?;
        compact(&file, &hdr, &mut entries)?;
        let mut h = hdr.clone();
        h.blocks_allocated = count;
        file.write_all_at(&h.to_bytes(), 0)?;
        file.sync()?;
        r.corruptions_fixed = r.corruptions;
    }
    Ok(r)
}
