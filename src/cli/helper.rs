//! The mount(8) helper: when installed as `/sbin/mount.fuse.imgfs` (or `mount.imgfs`), mount(8)
//! runs `mount.fuse.imgfs SOURCE MOUNTPOINT [-sfnv] [-o OPTS]`, and fstab lines like
//! `/var/lib/images/disk.qcow2 /mnt/img fuse.imgfs ro,allow_other,noauto 0 0` work.
//! This turns that call into `imgfs mount ...` arguments.

use std::ffi::OsString;

/// Is this executable being run under a mount-helper name?
pub fn is_helper_name(argv0: &std::ffi::OsStr) -> bool {
    let name = std::path::Path::new(argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "mount.fuse.imgfs" || name == "mount.imgfs"
}

/// What to do for a helper invocation.
#[derive(Debug, PartialEq)]
pub enum HelperCall {
    /// Run `imgfs` with these arguments.
    Mount(Vec<OsString>),
    /// `-f`: pretend (mount(8)'s fake mode).
    Fake,
}

/// Translate `SOURCE MOUNTPOINT [-sfnv] [-o a,b] [-t type]` into `mount ...` arguments.
pub fn translate(args: &[OsString]) -> Result<HelperCall, String> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let (mut sloppy, mut fake) = (false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        match s.as_ref() {
            "-o" => options.extend(
                it.next()
                    .ok_or("-o needs options")?
                    .to_string_lossy()
                    .split(',')
                    .map(str::to_string),
            ),
            "-t" => {
                it.next();
            }
            f if f.starts_with('-') && f.len() > 1 && !f.starts_with("-o") => {
                sloppy |= f.contains('s');
                fake |= f.contains('f');
            }
            f if f.starts_with("-o") => options.extend(f[2..].split(',').map(str::to_string)),
            _ => positional.push(a.clone()),
        }
    }
    if fake {
        return Ok(HelperCall::Fake);
    }
    let [source, mountpoint] = <[OsString; 2]>::try_from(positional)
        .map_err(|_| "usage: mount.fuse.imgfs IMAGE MOUNTPOINT [-o options]".to_string())?;
    let mut out: Vec<OsString> = vec!["mount".into()];
    for o in options.iter().filter(|o| !o.is_empty()) {
        let (k, v) = o
            .split_once('=')
            .map_or((o.as_str(), None), |(k, v)| (k, Some(v)));
        match (k, v) {
            ("ro", None) => out.push("--read-only".into()),
            ("allow_other", None) => out.push("--allow-other".into()),
            ("allow_backing_outside", None) => out.push("--allow-backing-outside".into()),
            ("format", Some(v)) => out.extend(["--format".into(), v.into()]),
            ("cache_size", Some(v)) => out.extend(["--cache-size".into(), v.into()]),
            ("threads", Some(v)) => out.extend(["--threads".into(), v.into()]),
            ("poll_us", Some(v)) => out.extend(["--poll-us".into(), v.into()]),
            ("uid", Some(v)) => out.extend(["--uid".into(), v.into()]),
            ("gid", Some(v)) => out.extend(["--gid".into(), v.into()]),
            ("umask", Some(v)) => out.extend(["--umask".into(), v.into()]),
            // mount(8) names the mounting user of a `user` fstab line.
            ("user", Some(_)) => {}
            // Generic options that mount(8), systemd or the kernel handle, or that we always apply.
            (
                "rw"
                | "defaults"
                | "auto"
                | "noauto"
                | "nofail"
                | "user"
                | "users"
                | "nouser"
                | "_netdev"
                | "nodev"
                | "nosuid"
                | "dev"
                | "suid"
                | "exec"
                | "noexec"
                | "atime"
                | "noatime"
                | "relatime"
                | "async"
                | "default_permissions",
                None,
            ) => {}
            (k, _) if k.starts_with("x-") || k == "comment" => {}
            _ if sloppy => {}
            _ => return Err(format!("unknown mount option {o:?}")),
        }
    }
    out.push(source);
    out.push(mountpoint);
    Ok(HelperCall::Mount(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn fstab_style_options_become_imgfs_flags() {
        let call = translate(&os(&[
            "/img/disk.qcow2",
            "/mnt/img",
            "-o",
            "ro,allow_other,noauto,x-systemd.automount,format=qcow2,cache_size=8M,user=joe,uid=1000,gid=100,umask=027",
        ]))
        .unwrap();
        assert_eq!(
            call,
            HelperCall::Mount(os(&[
                "mount",
                "--read-only",
                "--allow-other",
                "--format",
                "qcow2",
                "--cache-size",
                "8M",
                "--uid",
                "1000",
                "--gid",
                "100",
                "--umask",
                "027",
                "/img/disk.qcow2",
                "/mnt/img"
            ]))
        );
        assert_eq!(translate(&os(&["a", "b", "-f"])).unwrap(), HelperCall::Fake);
        assert!(translate(&os(&["a", "b", "-o", "bogus"])).is_err());
        assert!(translate(&os(&["a", "b", "-s", "-o", "bogus"])).is_ok());
        assert!(translate(&os(&["a"])).is_err());
    }
}
