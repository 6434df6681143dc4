//! The filesystem-level run: ext4 made inside the exposed file through a loop device, several
//! worker processes doing a file-tree workload (create, write, rename, unlink, truncate, fsync,
//! mkdir) with a model of every file, then fstrim, umount, `e2fsck -fn`, `imgfs check`,
//! `qemu-img check`, and every file read back through a fresh mount of everything.

use crate::{cases::Case, imgfs_check, mount, qemu_check, sh, sh_ok, umount, Args, Scratch};
use imgfs::host::SplitMix64;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const WORKERS: u64 = 4;
const MAX_FILES: usize = 40;

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

struct LoopDev(String);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = sh("losetup", &["-d", &self.0]);
    }
}

struct Ext4(PathBuf);

impl Drop for Ext4 {
    fn drop(&mut self) {
        if crate::is_mounted(&self.0) {
            let _ = sh("umount", &[s(&self.0)]);
        }
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn run(case: &Case, args: &Args, seed: u64) -> Result<String, String> {
    let mut scratch = Scratch::new(args, &format!("fs-{}", case.name), seed)?;
    let dir = scratch.path.clone();
    let mnt = dir.join("mnt");
    let fsdir = dir.join("ext4");
    std::fs::create_dir_all(&fsdir).map_err(|e| e.to_string())?;
    let img = crate::cases::build(case, &dir, crate::SIZE, crate::BSIZE, &args.imgfs, seed)?;
    let r = (|| {
        mount(&args.imgfs, &img, &mnt, &[])?;
        let file = mnt.join("disk.raw");
        let ops = args.ops.max(WORKERS);
        let trimmed;
        {
            let dev = LoopDev(
                sh_ok("losetup", &["-f", "--show", s(&file)])?
                    .trim()
                    .to_string(),
            );
            sh_ok("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &dev.0])?;
            sh_ok("mount", &[&dev.0, s(&fsdir)])?;
            let ext4 = Ext4(fsdir.clone());
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let children: Vec<_> = (0..WORKERS)
                .map(|w| {
                    std::process::Command::new(&exe)
                        .args([
                            "--fs-worker",
                            s(&fsdir),
                            &w.to_string(),
                            &(seed ^ ((w + 1) * 0x9e37_79b9)).to_string(),
                            &(ops / WORKERS).to_string(),
                            s(&dir.join(format!("manifest{w}"))),
                        ])
                        .output()
                })
                .collect();
            for (w, c) in children.into_iter().enumerate() {
                let out = c.map_err(|e| format!("worker {w}: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "fs worker {w} (seed {seed:#x}): {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            trimmed = sh_ok("fstrim", &["-v", s(&fsdir)])?.trim().to_string();
            drop(ext4);
            let (code, out) = sh("e2fsck", &["-fn", &dev.0])?;
            if code != 0 {
                return Err(format!("e2fsck -fn exited {code}: {out}"));
            }
        }
        umount(&args.imgfs, &mnt)?;
        imgfs_check(&args.imgfs, case.fmt, &img, false)?;
        if case.qemu_check {
            qemu_check(case.fmt, &img, false)?;
        }
        // Everything again through a fresh imgfs mount and a read-only ext4 mount.
        mount(&args.imgfs, &img, &mnt, &["--read-only"])?;
        let nfiles;
        {
            let dev = LoopDev(
                sh_ok("losetup", &["-f", "--show", "-r", s(&file)])?
                    .trim()
                    .to_string(),
            );
            sh_ok("mount", &["-o", "ro,noload", &dev.0, s(&fsdir)])?;
            let _ext4 = Ext4(fsdir.clone());
            nfiles = verify_manifests(&dir, &fsdir)?;
        }
        umount(&args.imgfs, &mnt)?;
        Ok(format!(
            "{WORKERS} workers x {} ops, {nfiles} files verified after remount, e2fsck -fn clean, {trimmed}",
            ops / WORKERS
        ))
    })();
    if r.is_err() {
        if crate::is_mounted(&fsdir) {
            let _ = sh("umount", &["-l", s(&fsdir)]);
        }
        scratch.keep = true;
    }
    r
}

fn verify_manifests(dir: &Path, fsdir: &Path) -> Result<usize, String> {
    let mut n = 0;
    for w in 0..WORKERS {
        let m =
            std::fs::read_to_string(dir.join(format!("manifest{w}"))).map_err(|e| e.to_string())?;
        for line in m.lines() {
            let (name, rest) = line.split_once(' ').ok_or("manifest line")?;
            let (len, hash) = rest.split_once(' ').ok_or("manifest line")?;
            let got = std::fs::read(fsdir.join(name)).map_err(|e| format!("{name}: {e}"))?;
            if got.len().to_string() != len || format!("{:x}", fnv(&got)) != hash {
                return Err(format!(
                    "{name}: after remount {} bytes (hash {:x}), want {len} (hash {hash})",
                    got.len(),
                    fnv(&got)
                ));
            }
            n += 1;
        }
    }
    Ok(n)
}

/// `imgfs-stress --fs-worker FSDIR W SEED OPS MANIFEST`: one worker process.
pub fn worker(argv: &[String]) -> ! {
    let r = (|| -> Result<(), String> {
        let [fsdir, w, seed, ops, manifest] = argv else {
            return Err("usage: --fs-worker FSDIR W SEED OPS MANIFEST".into());
        };
        let w: u64 = w.parse().map_err(|_| "W")?;
        let mut rng = SplitMix64::new(seed.parse().map_err(|_| "SEED")?);
        let ops: u64 = ops.parse().map_err(|_| "OPS")?;
        let root = Path::new(fsdir);
        let mine = root.join(format!("w{w}"));
        let shared = root.join("shared");
        for d in [&mine, &shared] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        // name (relative to the ext4 root) -> expected contents
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut next = 0u64;
        for op in 0..ops {
            let ctx = |e: std::io::Error, what: &str| format!("worker {w} op {op}: {what}: {e}");
            let pick = |rng: &mut SplitMix64, files: &BTreeMap<String, Vec<u8>>| {
                (!files.is_empty())
                    .then(|| {
                        files
                            .keys()
                            .nth(rng.below(files.len() as u64) as usize)
                            .cloned()
                    })
                    .flatten()
            };
            match rng.below(10) {
                0..=2 if files.len() < MAX_FILES => {
                    let sub = if rng.below(4) == 0 {
                        format!("w{w}/d{}", rng.below(4))
                    } else {
                        format!("w{w}")
                    };
                    std::fs::create_dir_all(root.join(&sub)).map_err(|e| ctx(e, "mkdir"))?;
                    let name = format!("{sub}/f{next}");
                    next += 1;
                    let mut data = vec![0u8; rng.below(96 << 10) as usize];
                    rng.fill(&mut data);
                    let mut f =
                        std::fs::File::create(root.join(&name)).map_err(|e| ctx(e, "create"))?;
                    f.write_all(&data).map_err(|e| ctx(e, "write"))?;
                    if rng.below(3) == 0 {
                        f.sync_all().map_err(|e| ctx(e, "fsync"))?;
                    }
                    files.insert(name, data);
                }
                3 | 4 => {
                    // Overwrite or extend a piece.
                    let Some(name) = pick(&mut rng, &files) else {
                        continue;
                    };
                    let data = files.get_mut(&name).expect("picked");
                    let off = rng.below(data.len() as u64 + 4096) as usize;
                    let mut piece = vec![0u8; 1 + rng.below(32 << 10) as usize];
                    rng.fill(&mut piece);
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(root.join(&name))
                        .map_err(|e| ctx(e, "open"))?;
                    f.write_all_at(&piece, off as u64)
                        .map_err(|e| ctx(e, "pwrite"))?;
                    if data.len() < off + piece.len() {
                        data.resize(off + piece.len(), 0);
                    }
                    data[off..off + piece.len()].copy_from_slice(&piece);
                    if rng.below(2) == 0 {
                        f.sync_data().map_err(|e| ctx(e, "fdatasync"))?;
                    }
                }
                5 => {
                    let Some(name) = pick(&mut rng, &files) else {
                        continue;
                    };
                    let new = if rng.below(2) == 0 {
                        format!("shared/w{w}-r{next}")
                    } else {
                        format!("w{w}/r{next}")
                    };
                    next += 1;
                    std::fs::rename(root.join(&name), root.join(&new))
                        .map_err(|e| ctx(e, "rename"))?;
                    let data = files.remove(&name).expect("picked");
                    files.insert(new, data);
                }
                6 => {
                    let Some(name) = pick(&mut rng, &files) else {
                        continue;
                    };
                    std::fs::remove_file(root.join(&name)).map_err(|e| ctx(e, "unlink"))?;
                    files.remove(&name);
                }
                7 => {
                    let Some(name) = pick(&mut rng, &files) else {
                        continue;
                    };
                    let data = files.get_mut(&name).expect("picked");
                    let len = rng.below(data.len() as u64 * 2 + 1) as usize;
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(root.join(&name))
                        .map_err(|e| ctx(e, "open"))?;
                    f.set_len(len as u64).map_err(|e| ctx(e, "truncate"))?;
                    data.resize(len, 0);
                }
                8 => {
                    // Read back and compare one file.
                    let Some(name) = pick(&mut rng, &files) else {
                        continue;
                    };
                    let got = std::fs::read(root.join(&name)).map_err(|e| ctx(e, "read"))?;
                    if got != files[&name] {
                        let at = got.iter().zip(&files[&name]).position(|(a, b)| a != b);
                        return Err(format!(
                            "worker {w} op {op}: {name} reads {} bytes, want {} (first difference at {at:?})",
                            got.len(),
                            files[&name].len()
                        ));
                    }
                }
                _ => {
                    let f = std::fs::File::open(&mine).map_err(|e| ctx(e, "open dir"))?;
                    f.sync_all().map_err(|e| ctx(e, "fsync dir"))?;
                    // SAFETY: syncfs(2) on an open descriptor.
                    if rng.below(4) == 0 {
                        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
                    }
                }
            }
        }
        // Every file must read back now; then the manifest for the check after remount.
        let mut m = String::new();
        for (name, data) in &files {
            let got = std::fs::read(root.join(name)).map_err(|e| format!("{name}: {e}"))?;
            if &got != data {
                return Err(format!("worker {w}: {name} differs at the end"));
            }
            m.push_str(&format!("{name} {} {:x}\n", data.len(), fnv(data)));
        }
        std::fs::write(manifest, m).map_err(|e| e.to_string())?;
        Ok(())
    })();
    match r {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
