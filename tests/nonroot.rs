//! Mounting as an ordinary user (through the setuid fusermount3), and who may open the exposed
//! files (the image file's owner, group and mode; uid=/gid=/umask= override).
//!
//! The tests create the unprivileged user `imgfs-test` (idempotently: other tests may create it
//! too) and make /dev/fuse mode 0666, as Debian's udev rule does.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const USER: &str = "imgfs-test";

/// Tests that install /sbin/mount.fuse.imgfs take turns (the first one done would remove it).
static HELPER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn mount_helper() -> (std::sync::MutexGuard<'static, ()>, MountHelper) {
    let guard = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    (guard, MountHelper::install())
}

/// Create the test user if missing and open /dev/fuse to everybody. Returns its uid.
fn test_user() -> u32 {
    if run("id", &["-u", USER]).status.code() != Some(0) {
        let out = run("useradd", &["-M", "-s", "/usr/sbin/nologin", USER]);
        // Exit 9: another test created it in the meantime.
        assert!(
            matches!(out.status.code(), Some(0) | Some(9)),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666)).unwrap();
    ok("id", &["-u", USER]).trim().parse().unwrap()
}

/// Run `cmd args` as the test user (from /, a directory the user may enter).
fn as_user(cmd: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", USER, "--", cmd])
        .args(args)
        .current_dir("/")
        .run_output()
        .unwrap()
}

fn as_user_ok(cmd: &str, args: &[&str]) -> String {
    let out = as_user(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} as {USER} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A scratch directory the test user may enter and list; `owned` also lets it create files.
fn user_dir(owned: bool) -> tempfile::TempDir {
    let t = tmpdir();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    if owned {
        chown(t.path());
    }
    t
}

fn chown(p: &Path) {
    ok("chown", &[USER, s(p)]);
}

/// An empty directory owned by the test user (fusermount3 wants a mountpoint it may write).
fn user_mountpoint(t: &Path, name: &str) -> PathBuf {
    let mnt = t.join(name);
    std::fs::create_dir(&mnt).unwrap();
    chown(&mnt);
    mnt
}

/// Detaches a mount on drop (as root), in case a test fails while it is mounted.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = run("umount", &["-l", s(&self.0)]);
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn user_mounts_writes_fsyncs_and_unmounts_through_fusermount3() {
    let uid = test_user();
    let t = user_dir(true);
    let img = t.path().join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    chown(&img);
    let mnt = user_mountpoint(t.path(), "mnt");
    let _c = Cleanup(mnt.clone());
    as_user_ok(IMGFS, &["mount", s(&img), s(&mnt)]);
    let line = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(s(&mnt)))
        .expect("mounted")
        .to_string();
    assert!(line.contains(" fuse.imgfs "), "{line}");
    assert!(line.contains(&format!("user_id={uid}")), "{line}");
    let disk = mnt.join("disk.raw");
    // The exposed file is the user's (the image is theirs), and the daemon runs as them.
    let st = as_user_ok("stat", &["-c", "%u %a %s", s(&disk)]);
    assert_eq!(st.trim(), format!("{uid} 644 {}", 16 << 20));
    let pid: i32 = as_user_ok(
        "getfattr",
        &["--only-values", "-n", "user.imgfs.pid", s(&mnt)],
    )
    .trim()
    .parse()
    .unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())),
        "daemon not running as {uid}: {status}"
    );
    // Write through dd with fsync, as the user.
    let data = random_bytes(7, 3 << 20);
    let src = write_file(t.path(), "data.bin", &data);
    as_user_ok(
        "dd",
        &[
            &format!("if={}", s(&src)),
            &format!("of={}", s(&disk)),
            "bs=1M",
            "seek=2",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
    let back = as_user(
        "dd",
        &[
            &format!("if={}", s(&disk)),
            "bs=1M",
            "skip=2",
            "count=3",
            "status=none",
        ],
    );
    assert_same(&back.stdout, &data, "read back as the user");
    // Root cannot look inside (no allow_other): imgfs umount says whose mount it is.
    let (done, err) = umount_dir(&mnt);
    assert!(!done && err.contains("another user"), "{err}");
    assert!(is_mounted(&mnt));
    // imgfs umount as the user goes through fusermount3 -u and waits for the clean close.
    as_user_ok(IMGFS, &["umount", s(&mnt)]);
    assert!(!is_mounted(&mnt));
    assert!(
        !process_alive(pid),
        "daemon {pid} still running after umount"
    );
    as_user_ok("qemu-img", &["check", "-q", s(&img)]);
    let mut want = vec![0u8; 16 << 20];
    want[2 << 20..5 << 20].copy_from_slice(&data);
    assert_compare_bytes("qcow2", &img, &want);
}

#[test]
fn fstab_user_line_mounts_as_the_user() {
    test_user();
    let _h = mount_helper();
    let t = user_dir(true);
    let data = random_bytes(8, 1 << 20);
    let img = write_file(t.path(), "fs.img", &data);
    chown(&img);
    let mnt = user_mountpoint(t.path(), "mnt");
    let _c = Cleanup(mnt.clone());
    let _f = FstabLine::add(&format!(
        "{} {} fuse.imgfs user,noauto,ro 0 0",
        s(&img),
        s(&mnt)
    ));
    as_user_ok("mount", &[s(&mnt)]);
    assert!(is_mounted(&mnt));
    let back = as_user("cat", &[s(&mnt.join("fs.raw"))]);
    assert_same(&back.stdout, &data, "fstab user mount");
    as_user_ok(IMGFS, &["umount", s(&mnt)]);
    assert!(!is_mounted(&mnt));
}

/// A line in /etc/fstab, removed on drop.
struct FstabLine(String);

impl FstabLine {
    fn add(line: &str) -> FstabLine {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/fstab")
            .unwrap();
        use std::io::Write;
        writeln!(f, "{line}").unwrap();
        FstabLine(line.to_string())
    }
}

impl Drop for FstabLine {
    fn drop(&mut self) {
        let text = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
        let kept: String = text
            .lines()
            .filter(|l| *l != self.0)
            .map(|l| format!("{l}\n"))
            .collect();
        let _ = std::fs::write("/etc/fstab", kept);
    }
}

#[test]
fn allow_other_as_user_needs_user_allow_other() {
    test_user();
    let t = user_dir(true);
    let img = write_file(t.path(), "a.img", &random_bytes(9, 1 << 20));
    chown(&img);
    let mnt = user_mountpoint(t.path(), "mnt");
    let _c = Cleanup(mnt.clone());
    let out = as_user(IMGFS, &["mount", "--allow-other", s(&img), s(&mnt)]);
    let allowed = std::fs::read_to_string("/etc/fuse.conf")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "user_allow_other");
    if allowed {
        // This machine allows it: the option must then work, not be dropped.
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .lines()
            .any(|l| l.contains(s(&mnt)) && l.contains("allow_other")));
        as_user_ok(IMGFS, &["umount", s(&mnt)]);
    } else {
        let err = stderr(&out);
        assert!(!out.status.success());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("user_allow_other") && err.contains("/etc/fuse.conf"),
            "{err}"
        );
        assert!(!is_mounted(&mnt));
    }
}

#[test]
fn unreadable_image_or_backing_file_is_named() {
    test_user();
    let t = user_dir(true);
    let mnt = user_mountpoint(t.path(), "mnt");
    let _c = Cleanup(mnt.clone());
    // Root's 0600 image: the user cannot open it at all.
    let secret = write_file(t.path(), "secret.img", &[0u8; 65536]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_user(IMGFS, &["mount", "-r", s(&secret), s(&mnt)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(s(&secret)) && err.contains("ermission denied"),
        "{err}"
    );
    // Readable but not writable (root's 0644): only a read-only mount.
    let shared = write_file(t.path(), "shared.img", &random_bytes(3, 65536));
    let out = as_user(IMGFS, &["mount", s(&shared), s(&mnt)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(s(&shared)), "{}", stderr(&out));
    as_user_ok(IMGFS, &["mount", "-r", s(&shared), s(&mnt)]);
    as_user_ok(IMGFS, &["umount", s(&mnt)]);
    // The user's overlay over a backing file only root may read: the error names the backing file.
    let base = t.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).unwrap();
    let top = t.path().join("top.qcow2");
    qcow2_overlay(&top, "base.qcow2");
    chown(&top);
    let out = as_user(IMGFS, &["mount", "-r", s(&top), s(&mnt)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(s(&base)) && err.contains("ermission denied"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
}

/// Can the test user open `p` for reading / for writing? (errno on failure)
fn user_can_open(p: &Path, write: bool) -> Result<(), String> {
    let script = if write {
        format!(": >> '{}'", s(p))
    } else {
        format!(": < '{}'", s(p))
    };
    let out = as_user("sh", &["-c", &script]);
    if out.status.success() {
        Ok(())
    } else {
        Err(stderr(&out))
    }
}

#[test]
fn exposed_file_takes_the_image_files_owner_and_mode() {
    let uid = test_user();
    let t = user_dir(false);
    let img = write_file(t.path(), "d.img", &random_bytes(4, 1 << 20));
    let mnt = t.path().join("mnt");
    let disk = mnt.join("d.raw");
    let perm = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;

    // Root's 0600 image shared with --allow-other: nobody else may open its disk.
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = Mount::new(&[&img], &mnt, &["--allow-other"]);
    assert_eq!(perm(&disk), 0o600);
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 0);
    let err = user_can_open(&disk, false).unwrap_err();
    assert!(err.contains("ermission denied"), "{err}");
    m.umount();

    // 0644: others may read, not write; read-only mounts drop every write bit.
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let m = Mount::new(&[&img], &mnt, &["--allow-other"]);
    assert_eq!(perm(&disk), 0o644);
    user_can_open(&disk, false).unwrap();
    assert!(user_can_open(&disk, true)
        .unwrap_err()
        .contains("ermission denied"));
    m.umount();
    let m = Mount::new(&[&img], &mnt, &["--allow-other", "-r"]);
    assert_eq!(perm(&disk), 0o444);
    m.umount();

    // uid=/umask= override: the 0600 image's disk given to the user, mode 0660.
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = Mount::new(
        &[&img],
        &mnt,
        &["--allow-other", "--uid", USER, "--umask", "007"],
    );
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o660));
    user_can_open(&disk, true).unwrap();
    m.umount();

    // The same through mount(8)'s option forms.
    let _h = mount_helper();
    ok(
        "mount",
        &[
            "-t",
            "fuse.imgfs",
            s(&img),
            s(&mnt),
            "-o",
            &format!("allow_other,uid={uid},gid=0,umask=077"),
        ],
    );
    let _c = Cleanup(mnt.clone());
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (uid, 0, 0o600)
    );
    user_can_open(&disk, false).unwrap();
    assert!(umount_dir(&mnt).0);
}
