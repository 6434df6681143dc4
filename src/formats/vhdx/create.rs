//! Creating VHDX images: dynamic, fixed, and differencing children of a VHDX parent.
//!
//! ```text
//!   0      file identifier "vhdxfile" + creator (UTF-16)
//!   64K    header 1 (sequence 1)    128K header 2 (sequence 2)
//!   192K   region table 1           256K region table 2
//!   1M     log (log_size)
//!   +      metadata region (1 MiB)
//!   +      BAT (rounded up to 1 MiB)
//!   +      payload blocks (fixed images only)
//! ```

use super::bat::{BatEntry, Geometry, Payload};
use super::header::{Guid, Header, Region, RegionTable, HEADER_OFFSETS, MIB, REGION_OFFSETS};
use super::metadata::{Metadata, MAX_VIRTUAL_SIZE};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;

struct Params {
    block_size: u64,
    log_size: u64,
    logical_sector: u64,
    physical_sector: u64,
    fixed: bool,
    block_state_zero: bool,
}

fn parse_size(k: &str, v: &str) -> Result<u64> {
    crate::options::opt_size("vhdx", k, v)
}

fn parse_bool(k: &str, v: &str) -> Result<bool> {
    crate::options::opt_bool("vhdx", k, v)
}

fn params(opts: &CreateOpts, parent: bool) -> Result<Params> {
    let mut p = Params {
        block_size: if parent { 2 * MIB } else { 32 * MIB },
        log_size: MIB,
        logical_sector: 512,
        physical_sector: 4096,
        fixed: false,
        block_state_zero: false,
    };
    for (k, v) in &opts.options {
        match k.as_str() {
            "block_size" => p.block_size = parse_size(k, v)?,
            "log_size" => p.log_size = parse_size(k, v)?,
            "logical_sector_size" => p.logical_sector = parse_size(k, v)?,
            "physical_sector_size" => p.physical_sector = parse_size(k, v)?,
            "subformat" => {
                p.fixed = match v.as_str() {
                    "dynamic" => false,
                    "fixed" => true,
                    _ => {
                        return Err(Error::invalid(format!(
                            "vhdx: subformat={v} (dynamic|fixed)"
                        )))
                    }
                }
            }
            "block_state_zero" => p.block_state_zero = parse_bool(k, v)?,
            _ => return Err(Error::invalid(format!("vhdx: unknown option {k:?}"))),
        }
    }
    if !p.block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&p.block_size) {
        return Err(Error::invalid(
            "vhdx: block_size must be a power of two, 1M..256M",
        ));
    }
    if p.log_size == 0 || !p.log_size.is_multiple_of(MIB) || p.log_size > 256 * MIB {
        return Err(Error::invalid(
            "vhdx: log_size must be a multiple of 1M up to 256M",
        ));
    }
    for s in [p.logical_sector, p.physical_sector] {
        if s != 512 && s != 4096 {
            return Err(Error::invalid("vhdx: sector sizes must be 512 or 4096"));
        }
    }
    Ok(p)
}

fn detail_u64(d: &serde_json::Map<String, serde_json::Value>, k: &str) -> Option<u64> {
    d.get(k).and_then(|v| v.as_u64())
}

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    let parent = opts.backing.as_ref();
    let mut p = params(opts, parent.is_some())?;
    let mut size = opts.size;
    let mut locator = vec![];
    if let Some(b) = parent {
        let info = opts
            .backing_info
            .as_ref()
            .ok_or_else(|| Error::invalid("vhdx: differencing image needs the parent's info"))?;
        if info.format != "vhdx" {
            return Err(Error::invalid(format!(
                "vhdx: the parent of a differencing VHDX must be a VHDX image, not {}",
                info.format
            )));
        }
        if p.fixed {
            return Err(Error::invalid("vhdx: a differencing image cannot be fixed"));
        }
        if size != 0 && size != info.virtual_size {
            return Err(Error::invalid(
                "vhdx: a differencing image has its parent's size",
            ));
        }
        size = info.virtual_size;
        let d = &info.details;
        p.logical_sector = detail_u64(d, "logical_sector_size").unwrap_or(p.logical_sector);
        p.physical_sector = detail_u64(d, "physical_sector_size").unwrap_or(p.physical_sector);
        let linkage = d
            .get("data_write_guid")
            .and_then(|v| v.as_str())
            .and_then(Guid::parse)
            .ok_or_else(|| Error::invalid("vhdx: parent info lacks its data_write_guid"))?;
        locator.push(("parent_linkage".to_string(), linkage.to_braced()));
        // relative_path is what imgfs follows; libvhdi reads absolute_win32_path first.
        let win = |p: &str| p.replace('/', "\\");
        let abs = if b.name.starts_with('/') {
            Some(b.name.clone())
        } else {
            locator.push(("relative_path".to_string(), format!(".\\{}", win(&b.name))));
            let dir = file.path().parent().unwrap_or(std::path::Path::new("."));
            dir.join(&b.name)
                .canonicalize()
                .ok()
                .and_then(|p| p.to_str().map(str::to_string))
        };
        if let Some(a) = abs {
            locator.push(("absolute_win32_path".to_string(), win(&a)));
        }
    }
    if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(p.logical_sector) {
        return Err(Error::invalid(format!(
            "vhdx: size {size} must be a non-zero multiple of the logical sector size, up to 64T"
        )));
    }
    let meta = Metadata {
        block_size: p.block_size,
        leave_blocks_allocated: p.fixed,
        has_parent: parent.is_some(),
        virtual_size: size,
        page83: Guid::random()?,
        logical_sector: p.logical_sector,
        physical_sector: p.physical_sector,
        parent: locator,
    };
    let log = Region {
        offset: MIB,
        length: p.log_size,
    };
    let md = Region {
        offset: log.end(),
        length: MIB,
    };
    // Size the BAT from the geometry (a region large enough to be accepted).
    let probe = Geometry::new(
        &meta,
        Region {
            offset: md.end(),
            length: u64::MAX / 2,
        },
    )?;
    let bat_region = Region {
        offset: md.end(),
        length: (probe.bat_entries * 8).div_ceil(MIB).max(1) * MIB,
    };
    let geo = Geometry::new(&meta, bat_region)?;
    let data_start = bat_region.end();
    let end = if p.fixed {
        data_start + geo.data_blocks * p.block_size
    } else {
        data_start
    };
    file.set_len(end)?;

    let mut id = vec![0u8; 64 << 10];
    id[..8].copy_from_slice(super::header::FILE_ID_SIGNATURE);
    for (i, u) in "imgfs".encode_utf16().enumerate() {
        id[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    file.write_all_at(&id, 0)?;
    let (fw, dw) = (Guid::random()?, Guid::random()?);
    for (i, at) in HEADER_OFFSETS.iter().enumerate() {
        let h = Header {
            sequence_number: i as u64 + 1,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: p.log_size as u32,
            log_offset: log.offset,
            raw: vec![],
        };
        file.write_all_at(&h.to_bytes(), *at)?;
    }
    let rt = RegionTable {
        bat: bat_region,
        metadata: md,
    }
    .to_bytes();
    for at in REGION_OFFSETS {
        file.write_all_at(&rt, at)?;
    }
    file.write_all_at(&meta.to_region(md.length as usize), md.offset)?;
    if p.fixed || p.block_state_zero {
        write_bat(file, &geo, &p, data_start)?;
    }
    file.sync()
}

/// BAT of a fixed image (every block at its place) or with explicit ZERO states.
fn write_bat(file: &HostFile, geo: &Geometry, p: &Params, data_start: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 16;
    let mut idx = 0;
    let mut block = 0;
    while idx < geo.bat_entries {
        let n = (geo.bat_entries - idx).min(CHUNK);
        let mut buf = vec![0u8; (n * 8) as usize];
        for i in 0..n {
            if geo.is_bitmap_index(idx + i) {
                continue;
            }
            if block >= geo.data_blocks {
                break;
            }
            let e = match (p.fixed, p.block_state_zero) {
                (true, zero) => {
                    let st = if zero {
                        Payload::Zero
                    } else {
                        Payload::FullyPresent
                    };
                    BatEntry::payload(st, data_start + block * p.block_size)
                }
                (false, _) => BatEntry::payload(Payload::Zero, 0),
            };
            buf[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.0.to_le_bytes());
            block += 1;
        }
        file.write_all_at(&buf, geo.entry_pos(idx))?;
        idx += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FaultFile;
    use std::path::Path;

    fn try_create(size: u64, opts: &[(&str, &str)]) -> Result<()> {
        let fault = FaultFile::new(vec![]);
        let co = CreateOpts {
            size,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..CreateOpts::default()
        };
        create(&fault.host_file(Path::new("c.vhdx"), true), &co)
    }

    #[test]
    fn options_are_validated() {
        assert!(try_create(MIB, &[]).is_ok());
        assert!(try_create(MIB, &[("block_size", "3M")]).is_err());
        assert!(try_create(MIB, &[("block_size", "512M")]).is_err());
        assert!(try_create(MIB, &[("log_size", "1000")]).is_err());
        assert!(try_create(MIB, &[("logical_sector_size", "1024")]).is_err());
        assert!(try_create(MIB, &[("subformat", "sparse")]).is_err());
        assert!(try_create(MIB, &[("cluster_size", "64k")]).is_err());
        assert!(try_create(0, &[]).is_err());
        assert!(try_create(1000, &[]).is_err());
        assert!(try_create(MAX_VIRTUAL_SIZE + MIB, &[]).is_err());
        assert!(try_create(4096, &[("logical_sector_size", "4096")]).is_ok());
        assert!(try_create(
            2 * MIB,
            &[("subformat", "fixed"), ("block_state_zero", "on")]
        )
        .is_ok());
    }

    #[test]
    fn differencing_needs_a_vhdx_parent() {
        let fault = FaultFile::new(vec![]);
        let f = fault.host_file(Path::new("c.vhdx"), true);
        let mut co = CreateOpts {
            backing: Some(crate::format::BackingRef {
                name: "p.raw".into(),
                format: Some("raw".into()),
            }),
            ..CreateOpts::default()
        };
        assert!(create(&f, &co).is_err(), "no parent info");
        co.backing_info = Some(crate::format::ImageInfo {
            format: "raw",
            virtual_size: MIB,
            cluster_size: 512,
            backing: None,
            details: Default::default(),
        });
        assert!(create(&f, &co).is_err(), "raw parent");
        if let Some(info) = co.backing_info.as_mut() {
            info.format = "vhdx";
        }
        assert!(create(&f, &co).is_err(), "parent without data_write_guid");
        if let Some(info) = co.backing_info.as_mut() {
            let g = Guid([1; 16]).to_braced();
            info.details.insert("data_write_guid".into(), g.into());
        }
        assert!(create(&f, &co).is_ok());
    }
}
