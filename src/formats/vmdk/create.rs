//! `imgfs create -f vmdk`: the files `qemu-img create -f vmdk` makes, with its option names
//! (subformat, adapter_type, compat6, hwversion, zeroed_grain, backing file).
//!
//! ```text
//!  sparse extent:  | header | descriptor (20 sectors) | RGD | RGTs | GD | GTs | pad to a grain |
//!  split disks:    NAME.vmdk (descriptor) + NAME-s001.vmdk ... (sparse) / NAME-f001.vmdk (flat),
//!                  2 GiB each; monolithicFlat: NAME.vmdk + NAME-flat.vmdk
//! ```

use super::descriptor::{NewDescriptor, NO_PARENT};
use super::sparse::{
    Header, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NL_TEST, FLAG_RGD, FLAG_ZERO_GRAIN, SECTOR,
};
use super::{new_cid, MAX_SECTORS};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;
use crate::options::opt_bool;

const SPLIT: u64 = 2 << 30;
const GRAIN_SECTORS: u64 = 128;
const DESC_SECTORS: u64 = 20;

struct Opts {
    subformat: String,
    adapter: String,
    hw_version: String,
    zeroed_grain: bool,
}

fn parse_opts(o: &CreateOpts) -> Result<Opts> {
    let mut r = Opts {
        subformat: "monolithicSparse".into(),
        adapter: "ide".into(),
        hw_version: "4".into(),
        zeroed_grain: false,
    };
    let mut compat6 = false;
    let mut hw = None;
    for (k, v) in &o.options {
        match k.as_str() {
            "subformat" => r.subformat = v.clone(),
            "adapter_type" => r.adapter = v.clone(),
            "compat6" => compat6 = opt_bool("vmdk", k, v)?,
            "hwversion" => hw = Some(v.clone()),
            "zeroed_grain" => r.zeroed_grain = opt_bool("vmdk", k, v)?,
            "backing_fmt" if v == "vmdk" => {}
            "backing_fmt" => {
                return Err(Error::invalid("a VMDK's backing file must be a VMDK"));
            }
            _ => return Err(Error::invalid(format!("unknown vmdk option {k:?}"))),
        }
    }
    if !matches!(
        r.subformat.as_str(),
        "monolithicSparse"
            | "monolithicFlat"
            | "twoGbMaxExtentSparse"
            | "twoGbMaxExtentFlat"
            | "streamOptimized"
    ) {
        return Err(Error::invalid(format!(
            "unknown vmdk subformat {:?} (monolithicSparse, monolithicFlat, twoGbMaxExtentSparse, \
             twoGbMaxExtentFlat, streamOptimized)",
            r.subformat
        )));
    }
    if !matches!(
        r.adapter.as_str(),
        "ide" | "lsilogic" | "buslogic" | "legacyESX"
    ) {
        return Err(Error::invalid(format!(
            "unknown adapter_type {:?} (ide, lsilogic, buslogic, legacyESX)",
            r.adapter
        )));
    }
    if r.adapter == "legacyESX" {
        r.adapter = "buslogic".into(); // what QEMU writes for it
    }
    if compat6 && hw.is_some() {
        return Err(Error::invalid("compat6 and hwversion cannot both be given"));
    }
    r.hw_version = hw.unwrap_or_else(|| if compat6 { "6" } else { "4" }.into());
    Ok(r)
}

/// The header and table layout of a new sparse extent of `sectors`.
pub fn sparse_layout(sectors: u64, zeroed: bool, compressed: bool) -> Header {
    let grains = sectors.div_ceil(GRAIN_SECTORS);
    let gt_sectors = (512u64 * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(512).max(1);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd = 1 + DESC_SECTORS;
    let gd = rgd + gd_sectors + gt_sectors * gt_count;
    let overhead =
        (gd + gd_sectors + gt_sectors * gt_count).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
    let mut flags = FLAG_NL_TEST | FLAG_RGD;
    if zeroed {
        flags |= FLAG_ZERO_GRAIN;
    }
    if compressed {
        flags |= FLAG_COMPRESSED | FLAG_MARKERS;
    }
    Header {
        version: if compressed {
            3
        } else if zeroed {
            2
        } else {
            1
        },
        flags,
        capacity: sectors,
        grain: GRAIN_SECTORS,
        desc_offset: 1,
        desc_size: DESC_SECTORS,
        gtes_per_gt: 512,
        rgd_offset: rgd,
        gd_offset: gd,
        overhead,
        unclean: 0,
        compress: compressed as u16,
    }
}

/// Write a new sparse extent (header, optional embedded descriptor, both directories pointing
/// at preallocated empty tables) into `file`.
fn write_sparse(file: &HostFile, h: &Header, desc: Option<&str>) -> Result<()> {
    let gt_sectors = h.gt_bytes().div_ceil(SECTOR);
    let n = h.gd_entries();
    let gd_sectors = (n * 4).div_ceil(SECTOR);
    let dir = |base: u64| -> Vec<u8> {
        (0..n)
            .flat_map(|i| ((base + gd_sectors + i * gt_sectors) as u32).to_le_bytes())
            .collect()
    };
    file.set_len(h.overhead * SECTOR)?;
    file.write_all_at(&dir(h.rgd_offset), h.rgd_offset * SECTOR)?;
    file.write_all_at(&dir(h.gd_offset), h.gd_offset * SECTOR)?;
    if let Some(d) = desc {
        file.write_all_at(d.as_bytes(), h.desc_offset * SECTOR)?;
    }
    file.write_all_at(&h.to_bytes(), 0)?;
    file.sync()
}

pub fn create(file: &HostFile, o: &CreateOpts) -> Result<()> {
    let opts = parse_opts(o)?;
    if !o.size.is_multiple_of(SECTOR) {
        return Err(Error::invalid("VMDK size must be a multiple of 512 bytes"));
    }
    let sectors = o.size / SECTOR;
    if sectors > MAX_SECTORS {
        return Err(Error::invalid("VMDK size over 64 TiB"));
    }
    let parent_cid = match &o.backing_info {
        None => NO_PARENT,
        Some(b) if b.format == "vmdk" => {
            b.details
                .get("cid")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| Error::invalid("backing VMDK has no CID"))? as u32
        }
        Some(b) => {
            return Err(Error::invalid(format!(
                "a VMDK's backing file must be a VMDK, not {}",
                b.format
            )))
        }
    };
    if o.backing.is_some()
        && o.backing_info
            .as_ref()
            .is_some_and(|b| b.virtual_size != o.size)
    {
        return Err(Error::invalid(
            "a VMDK delta disk must have its parent's size",
        ));
    }
    let path = file.path();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| Error::invalid("image file name is not UTF-8"))?
        .to_string();
    let own = path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let sub = opts.subformat.as_str();
    let sparse = !sub.ends_with("Flat");
    let extents: Vec<(u64, &'static str, String)> = match sub {
        "monolithicSparse" | "streamOptimized" => vec![(sectors, "SPARSE", own)],
        "monolithicFlat" => vec![(sectors, "FLAT", format!("{stem}-flat.vmdk"))],
        _ => {
            let (kind, letter) = if sparse {
                ("SPARSE", 's')
            } else {
                ("FLAT", 'f')
            };
            let per = SPLIT / SECTOR;
            let n = sectors.div_ceil(per).max(1);
            (0..n)
                .map(|i| {
                    let s = (sectors - i * per).min(per);
                    (s, kind, format!("{stem}-{letter}{:03}.vmdk", i + 1))
                })
                .collect()
        }
    };
    let desc = NewDescriptor {
        cid: new_cid(parent_cid),
        parent_cid,
        create_type: sub,
        parent_hint: o.backing.as_ref().map(|b| b.name.as_str()),
        extents: extents.clone(),
        hw_version: &opts.hw_version,
        adapter_type: &opts.adapter,
        sectors,
    }
    .render();
    if matches!(sub, "monolithicSparse" | "streamOptimized") {
        if desc.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(Error::invalid(
                "VMDK descriptor does not fit its 20 sectors",
            ));
        }
        let h = sparse_layout(sectors, opts.zeroed_grain, sub == "streamOptimized");
        return write_sparse(file, &h, Some(&desc));
    }
    for (s, kind, name) in &extents {
        let f = HostFile::create(&dir.join(name))?;
        if *kind == "SPARSE" {
            write_sparse(&f, &sparse_layout(*s, opts.zeroed_grain, false), None)?;
        } else {
            f.set_len(s * SECTOR)?;
            f.sync()?;
        }
    }
    file.write_all_at(desc.as_bytes(), 0)?;
    file.sync()
}
