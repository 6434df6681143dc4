//! `TestImage`: one way for every test to describe an image (format, size, `-o` options,
//! backing file), make it with `qemu-img create` or with imgfs's own create, fill it with
//! qemu-io, mount it, and run the usual power-cut loop over it.

use super::{qemu_check, qemu_img, qemu_io, qemu_raw, random_bytes, write_file, Mount};
use imgfs::crashsim::{run_many, Workload};
use std::path::{Path, PathBuf};

/// An image to be made: see [`TestImage::build`].
#[must_use = "make the image with .qemu() or .imgfs()"]
pub struct ImageSpec {
    path: PathBuf,
    fmt: String,
    size: Option<String>,
    opts: Vec<(String, String)>,
    backing: Option<(String, Option<String>)>,
    unchecked: bool,
}

/// An image file of a known format (made by [`ImageSpec`], or an existing one via [`TestImage::at`]).
#[derive(Clone, Debug)]
pub struct TestImage {
    pub path: PathBuf,
    pub fmt: String,
}

impl ImageSpec {
    /// The virtual size, as qemu-img takes it (`8M`, `5243392`).
    pub fn size(mut self, size: impl ToString) -> Self {
        self.size = Some(size.to_string());
        self
    }

    /// One `-o key=value` option.
    pub fn opt(mut self, key: &str, value: impl ToString) -> Self {
        self.opts.push((key.to_string(), value.to_string()));
        self
    }

    /// Options as qemu-img's `-o` takes them (`cluster_size=4096,table_size=2`; "" for none).
    pub fn opts(mut self, list: &str) -> Self {
        for kv in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            self.opts.push((k.to_string(), v.to_string()));
        }
        self
    }

    /// A backing file, by the name written into the header (relative to the image's folder),
    /// and its format (`-F`; `None` leaves it to probing).
    pub fn backing(mut self, name: &str, fmt: Option<&str>) -> Self {
        self.backing = Some((name.to_string(), fmt.map(str::to_string)));
        self
    }

    /// `create -f FMT [-o OPTS] [-b NAME [-F FMT]] PATH [SIZE]`: the same for qemu-img and imgfs.
    /// Do not open the backing file (qemu-img's `-u`, for names that cannot be opened).
    pub fn unchecked(mut self) -> Self {
        self.unchecked = true;
        self
    }

    fn create_args(&self) -> Vec<String> {
        let mut args = vec!["create".to_string(), "-f".into(), self.fmt.clone()];
        if !self.opts.is_empty() {
            let kv: Vec<String> = self.opts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            args.extend(["-o".into(), kv.join(",")]);
        }
        if let Some((name, fmt)) = &self.backing {
            args.extend(["-b".into(), name.clone()]);
            if let Some(f) = fmt {
                args.extend(["-F".into(), f.clone()]);
            }
        }
        if self.unchecked {
            args.push("-u".into());
        }
        args.push(self.path.display().to_string());
        args.extend(self.size.clone());
        args
    }

    fn made(self) -> TestImage {
        TestImage {
            path: self.path,
            fmt: self.fmt,
        }
    }

    /// `qemu-img create -q -f FMT [-o OPTS] [-b NAME [-F FMT]] PATH [SIZE]`.
    pub fn qemu(self) -> TestImage {
        let mut args = self.create_args();
        args.insert(1, "-q".into());
        qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>());
        self.made()
    }

    /// `imgfs create -f FMT [-o OPTS] [-b NAME [-F FMT]] PATH [SIZE]` (the command line), which
    /// must succeed.
    pub fn cli(self) -> TestImage {
        let args = self.create_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = imgfs_cmd(&args);
        assert_eq!(code, 0, "imgfs {args:?}: {err}");
        self.made()
    }

    /// imgfs's own create (the format's `create` on a new host file). As `imgfs create` does,
    /// the backing image is opened for its info, and gives the size when none is set.
    pub fn imgfs(self) -> TestImage {
        use imgfs::image::{BackingRef, CreateOpts};
        let mut co = CreateOpts {
            options: self.opts.iter().cloned().collect(),
            ..CreateOpts::default()
        };
        if let Some((name, fmt)) = &self.backing {
            let dir = self.path.parent().unwrap();
            let info = imgfs::Image::open(&dir.join(name), &super::open_opts(true))
                .unwrap_or_else(|e| panic!("backing {name}: {e}"))
                .info();
            co.size = info.virtual_size;
            co.backing_info = Some(info);
            co.backing = Some(BackingRef {
                name: name.clone(),
                format: fmt.clone(),
            });
        }
        if let Some(s) = &self.size {
            co.size = imgfs::options::parse_size(s).unwrap();
        }
        self.try_imgfs_with(&co)
            .unwrap_or_else(|e| panic!("create {}: {e}", self.path.display()));
        self.made()
    }

    /// imgfs's create with these very options (only the path and format of the spec are used):
    /// for tests of what create refuses.
    pub fn try_imgfs_with(&self, co: &imgfs::image::CreateOpts) -> imgfs::Result<()> {
        let f = imgfs::host::HostFile::create(&self.path)?;
        imgfs::formats::by_name(&self.fmt)?.create(&f, co)
    }
}

impl TestImage {
    /// `NAME` in `dir`, of format `fmt`: describe it, then make it with `.qemu()` or `.imgfs()`.
    pub fn build(dir: &Path, name: &str, fmt: &str) -> ImageSpec {
        ImageSpec {
            path: dir.join(name),
            fmt: fmt.to_string(),
            size: None,
            opts: Vec::new(),
            backing: None,
            unchecked: false,
        }
    }

    /// The image at `path` (its folder and name), of format `fmt`: describe it, then make it.
    pub fn build_at(path: &Path, fmt: &str) -> ImageSpec {
        let name = path.file_name().unwrap().to_str().unwrap();
        TestImage::build(path.parent().unwrap(), name, fmt)
    }

    /// An image that is already there.
    pub fn at(path: &Path, fmt: &str) -> TestImage {
        TestImage {
            path: path.to_path_buf(),
            fmt: fmt.to_string(),
        }
    }

    pub fn p(&self) -> &str {
        self.path.to_str().unwrap()
    }

    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }

    /// `qemu-io -f FMT PATH -c CMD...`, each must succeed.
    pub fn io(&self, cmds: &[&str]) -> &Self {
        qemu_io(&self.fmt, &self.path, cmds);
        self
    }

    /// `qemu-io` runs `cmds` then `abort`s without closing (for qcow2: the dirty bit stays set
    /// and lazy refcounts are not written). Its exit status is not looked at.
    pub fn io_then_abort(&self, cmds: &[&str]) -> &Self {
        let mut args = vec!["-f", self.fmt.as_str(), self.p()];
        for c in cmds.iter().chain(&["abort"]) {
            args.extend(["-c", c]);
        }
        let _ = super::run("qemu-io", &args);
        self
    }

    /// qemu-io writes of random bytes (seed `seed`, `data_len` of them, in a data file beside
    /// the image): `write -s DATA OFF LEN` for each `(OFF, LEN)`, in one qemu-io run.
    pub fn write_random(&self, seed: u64, data_len: usize, writes: &[(u64, u64)]) -> &Self {
        let name = format!(
            "{}.data{seed}",
            self.path.file_name().unwrap().to_str().unwrap()
        );
        let data = write_file(self.dir(), &name, &random_bytes(seed, data_len));
        let cmds: Vec<String> = writes
            .iter()
            .map(|(off, len)| format!("write -s {} {off} {len}", data.display()))
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        self.io(&cmds)
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }

    /// What QEMU says the guest sees (`qemu-img convert -O raw`).
    pub fn raw(&self) -> Vec<u8> {
        qemu_raw(&self.path)
    }

    /// `imgfs mount EXTRA... PATH DIR`.
    pub fn mount(&self, dir: &Path, extra: &[&str]) -> Mount {
        Mount::new(&[&self.path], dir, extra)
    }

    /// The name of the exposed disk in a mount: `<stem>.raw`.
    pub fn disk_name(&self) -> String {
        format!("{}.raw", self.path.file_stem().unwrap().to_str().unwrap())
    }

    /// The usual power-cut loop: the crash simulator (`crashsim::run_many`) over the image's
    /// current bytes for every seed; every `every`-th seed's crashed image is written beside it
    /// as `crashed.EXT` and handed to `check(seed, path)`. Every seed must pass; returns the
    /// table evictions the runs did.
    pub fn crash_loop(
        &self,
        seeds: std::ops::Range<u64>,
        work: &Workload,
        every: u64,
        mut check: impl FnMut(u64, &Path),
    ) -> u64 {
        let initial = self.bytes();
        let ext = self
            .path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("img");
        let crashed = self.dir().join(format!("crashed.{ext}"));
        let mut evictions = 0;
        let n = run_many(
            &initial,
            &self.path,
            &self.fmt,
            seeds.clone(),
            work,
            |seed, cut| {
                evictions += cut.evictions;
                if every != 0 && seed % every == 0 {
                    std::fs::write(&crashed, &cut.image).unwrap();
                    check(seed, &crashed);
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.path.display()));
        assert_eq!(n, seeds.end - seeds.start);
        evictions
    }
}

/// Power cuts with the smallest (two-table) metadata cache and few fsyncs, so dirty tables
/// are written back by eviction between fsyncs, not only by flushes.
pub fn eviction_workload() -> Workload {
    Workload {
        ops: 60,
        max_write: 16_000,
        discard_pct: 0,
        fsync_pct: 10,
        cache_size: 0,
        ..Workload::default()
    }
}

/// `qemu-img check` finds no corruption (exit 0, or 3 for leaks only).
pub fn assert_no_corruption(fmt: &str, img: &Path, what: &str) {
    let (code, out) = qemu_check(fmt, img);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check {code}: {out}"
    );
}

/// `imgfs ARGS...`: exit code, stdout, stderr.
pub fn imgfs_cmd(args: &[&str]) -> (i32, String, String) {
    let out = super::run(super::IMGFS, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `qemu-img info --output=json` as JSON.
pub fn qemu_info(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", img.to_str().unwrap()])).unwrap()
}

/// The virtual size `qemu-img info` reports.
pub fn qemu_virtual_size(img: &Path) -> u64 {
    qemu_info(img)["virtual-size"].as_u64().unwrap()
}
