//! `imgfs create -f vpc|vhd -o subformat=dynamic|fixed,force_size=on|off [-b PARENT]`.
//!
//! Sizes follow QEMU: without `force_size` the size is rounded up to what a CHS geometry can
//! describe and the creator is "qemu" (readers size the disk by its geometry); with it the size
//! is kept (whole sectors), the geometry is set to its maximum and the creator is "qem2".
//! Differencing disks (`-b`, a VHD parent) take the parent's size and unique id and name it by
//! three locators: W2ku (absolute), W2ru (relative) and MacX (file URL).
//!
//! ```text
//!  dynamic: [footer copy 512][dyn header 1024][BAT, 0xff..][locator data...][footer 512]
//!  fixed:   [zeros (sparse) ....................................][footer 512]
//! ```

use super::dynamic::{DynHeader, HEADER_LEN};
use super::footer::{self, DiskType, Footer, FOOTER_LEN, MAX_SECTORS, SECTOR};
use super::parent::{self, Locator, LOCATORS};
use crate::error::{Error, Result};
use crate::format::CreateOpts;
use crate::host::HostFile;
use crate::options::opt_bool;

const BLOCK_SIZE: u32 = 2 << 20;
const MIB: u64 = 1 << 20;

pub fn create(file: &HostFile, opts: &CreateOpts) -> Result<()> {
    let mut subformat = DiskType::Dynamic;
    let mut force_size = false;
    for (k, v) in &opts.options {
        match k.as_str() {
            "subformat" => {
                subformat = match v.as_str() {
                    "dynamic" => DiskType::Dynamic,
                    "fixed" => DiskType::Fixed,
                    _ => {
                        return Err(Error::invalid(format!(
                            "vpc: subformat={v}: expected dynamic or fixed"
                        )))
                    }
                }
            }
            "force_size" => force_size = opt_bool("vpc", k, v)?,
            _ => return Err(Error::invalid(format!("vpc: unknown option {k:?}"))),
        }
    }
    let parent = match (&opts.backing, &opts.backing_info) {
        (Some(b), Some(info)) => {
            if subformat == DiskType::Fixed {
                return Err(Error::invalid(
                    "vpc: a differencing disk (-b) cannot be subformat=fixed",
                ));
            }
            if info.format != "vpc" {
                return Err(Error::invalid(format!(
                    "vpc: the parent of a differencing VHD must be a VHD, {:?} is {}",
                    b.name, info.format
                )));
            }
            let id = info
                .details
                .get("unique_id")
                .and_then(|v| v.as_str())
                .and_then(|s| uuid::Uuid::parse_str(s).ok())
                .ok_or_else(|| Error::invalid("vpc: the parent has no unique id"))?;
            Some((b.name.clone(), *id.as_bytes()))
        }
        (Some(_), None) => return Err(Error::invalid("vpc: the parent could not be opened")),
        _ => None,
    };
    let mut f = new_footer(opts.size, force_size || parent.is_some())?;
    if subformat == DiskType::Fixed && f.current_size % MIB != 0 {
        log::warn!(
            "{}: a fixed VHD of {} bytes is not a whole number of MiB; Azure accepts only \
             whole-MiB fixed VHDs (ask for a whole-MiB size with force_size=on)",
            file.path().display(),
            f.current_size
        );
    }
    match (subformat, parent) {
        (DiskType::Fixed, _) => {
            f.disk_type = DiskType::Fixed;
            f.data_offset = u64::MAX;
            file.set_len(f.current_size + FOOTER_LEN as u64)?;
            file.write_all_at(&f.to_bytes(), f.current_size)
        }
        (_, None) => {
            f.disk_type = DiskType::Dynamic;
            write_dynamic(file, &f, &[], None)
        }
        (_, Some((name, id))) => {
            f.disk_type = DiskType::Differencing;
            let (locs, stamp, uname) = parent_locators(file, &name)?;
            write_dynamic(file, &f, &locs, Some((id, stamp, uname)))
        }
    }
}

/// A footer for a disk of `size` bytes, sized as QEMU sizes it.
fn new_footer(size: u64, force_size: bool) -> Result<Footer> {
    let want = size.div_ceil(SECTOR);
    let (mut c, mut h, mut s) = (65535u16, 16u8, 255u8);
    let mut total = want;
    if !force_size {
        // The smallest geometry covering the size (rounding up, never truncating).
        let mut n = want;
        loop {
            (c, h, s) = footer::geometry(n);
            let chs = c as u64 * h as u64 * s as u64;
            if chs >= want || chs == 65535 * 16 * 255 || n > want + 65536 {
                total = if chs == 65535 * 16 * 255 { want } else { chs };
                break;
            }
            n += 1;
        }
    }
    if total > MAX_SECTORS {
        return Err(Error::invalid(format!(
            "vpc: disk size {size} is larger than the 2040 GiB a VHD can hold"
        )));
    }
    if total == 0 {
        return Err(Error::invalid("vpc: disk size must be at least 512 bytes"));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    Ok(Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: SECTOR,
        timestamp: footer::now_stamp(),
        creator_app: if force_size { *b"qem2" } else { *b"qemu" },
        creator_version: 0x0005_0003,
        creator_os: u32::from_be_bytes(*b"Wi2k"),
        original_size: total * SECTOR,
        current_size: total * SECTOR,
        cylinders: c,
        heads: h,
        sectors: s,
        disk_type: DiskType::Dynamic,
        unique_id: id,
        saved_state: 0,
    })
}

/// Locators with their data, the parent's time stamp and its name in UTF-16BE.
type ParentFacts = (Vec<(Locator, Vec<u8>)>, u32, [u8; 512]);

/// Locator paths for `name` as given to `-b` (relative to the new image's directory), the
/// parent's modification time stamp and its file name in UTF-16BE.
fn parent_locators(file: &HostFile, name: &str) -> Result<ParentFacts> {
    let dir = file
        .path()
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let abs = dir
        .join(name)
        .canonicalize()
        .map_err(|e| Error::io(format!("vpc: cannot find parent {name:?}"), e))?;
    let abs_s = abs.to_string_lossy().into_owned();
    let mtime = std::fs::metadata(&abs)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs().saturating_sub(footer::VHD_EPOCH) as u32)
        .unwrap_or(0);
    let rel = if std::path::Path::new(name).is_absolute() {
        abs.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        name.to_string()
    };
    let datas = [
        (
            parent::W2KU,
            parent::utf16_encode(&abs_s.replace('/', "\\"), false),
        ),
        (
            parent::W2RU,
            parent::utf16_encode(&parent::w2ru_path(&rel), false),
        ),
        (parent::MACX, parent::macx_url(&abs_s).into_bytes()),
    ];
    let locs = datas
        .into_iter()
        .map(|(code, d)| {
            let l = Locator {
                code,
                data_space: (d.len() as u64).div_ceil(SECTOR) as u32,
                data_len: d.len() as u32,
                offset: 0,
            };
            (l, d)
        })
        .collect();
    let base = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut uname = [0u8; 512];
    let enc = parent::utf16_encode(&base, true);
    let n = enc.len().min(510);
    uname[..n].copy_from_slice(&enc[..n]);
    Ok((locs, mtime, uname))
}

fn write_dynamic(
    file: &HostFile,
    f: &Footer,
    locs: &[(Locator, Vec<u8>)],
    parent: Option<([u8; 16], u32, [u8; 512])>,
) -> Result<()> {
    let spb = BLOCK_SIZE as u64 / SECTOR;
    let entries = (f.current_size / SECTOR).div_ceil(spb);
    let bat_offset = SECTOR + HEADER_LEN as u64;
    let bat_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let mut pos = bat_offset + bat_len;
    let mut locators = [Locator::default(); LOCATORS];
    for (i, (l, data)) in locs.iter().enumerate().take(LOCATORS) {
        locators[i] = Locator { offset: pos, ..*l };
        file.write_all_at(data, pos)?;
        pos += l.data_space as u64 * SECTOR;
    }
    let (parent_id, parent_timestamp, parent_name) = parent.unwrap_or(([0; 16], 0, [0; 512]));
    let h = DynHeader {
        table_offset: bat_offset,
        version: 0x0001_0000,
        max_table_entries: entries as u32,
        block_size: BLOCK_SIZE,
        parent_id,
        parent_timestamp,
        parent_name,
        locators,
    };
    file.write_all_at(&f.to_bytes(), 0)?;
    file.write_all_at(&h.to_bytes(), SECTOR)?;
    file.write_all_at(&vec![0xff; bat_len as usize], bat_offset)?; // UNALLOCATED
    file.write_all_at(&f.to_bytes(), pos)
}
