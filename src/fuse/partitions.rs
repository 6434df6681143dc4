//! FUSE side of partition views (`src/views`): the `<stem>.partitions/` directories, their `N.raw`
//! files, and `Target`, the (image, offset, size) window every data request goes through.
//!
//! Partition nodes change with the table, so the kernel gets them with zero entry and attribute
//! TTLs: every lookup comes back here and sees the current table.

use super::ImgFs;
use crate::image::Image;
use crate::views::{Partitions, View};
use fuser::{Errno, FileAttr, FileType, INodeNo};
use std::sync::Arc;
use std::time::Duration;

/// What a data request on an inode reads and writes: `size` bytes of `image` from `base`.
pub struct Target {
    pub image: Arc<Image>,
    pub base: u64,
    pub size: u64,
    /// A partition window (never served by passthrough).
    pub partition: bool,
}

/// Partition nodes are never cached by the kernel: the table can change under them.
pub const PART_TTL: Duration = Duration::ZERO;

impl ImgFs {
    /// Expose the partitions of every disk file (`--no-partitions` leaves them out).
    pub fn with_partitions(mut self, enabled: bool) -> ImgFs {
        if enabled {
            let files = self
                .tree
                .nodes()
                .filter_map(|n| match &n.kind {
                    super::NodeKind::File { image } => {
                        Some((n.ino, n.parent, n.name.clone(), image.clone()))
                    }
                    _ => None,
                })
                .collect();
            self.parts = Arc::new(Partitions::new(files));
        }
        self
    }

    /// The partition registry (the mount code hands it the session's notifier).
    pub fn partitions(&self) -> Arc<Partitions> {
        self.parts.clone()
    }

    pub(super) fn target(&self, ino: INodeNo) -> Result<Target, Errno> {
        if let Some(v) = self.parts.view(ino.0) {
            let disk = self.parts.disk_of(&v);
            return Ok(Target {
                image: disk.image.clone(),
                base: v.part.start,
                size: v.part.len,
                partition: true,
            });
        }
        if Partitions::is_file_ino(ino.0) {
            // The partition this file was went away with a table change.
            return Err(Errno::ENXIO);
        }
        match self.tree.get(ino.0).map(|n| &n.kind) {
            Some(super::NodeKind::File { image }) => Ok(Target {
                image: image.clone(),
                base: 0,
                size: image.size(),
                partition: false,
            }),
            Some(super::NodeKind::Dir { .. }) => Err(Errno::EISDIR),
            None if self.parts.dir(ino.0).is_some() => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn view_attr(&self, v: &View) -> Option<FileAttr> {
        let disk = self.parts.disk_of(v);
        let mut a = self.attr(self.tree.get(disk.disk_ino)?);
        a.ino = INodeNo(v.ino);
        a.size = v.part.len;
        a.blocks = disk.image.host_allocated().min(v.part.len).div_ceil(512);
        Some(a)
    }

    fn dir_attr(&self, ino: u64, entries: usize) -> Option<FileAttr> {
        let parent = self.parts.dir(ino)?.parent;
        let mut a = self.attr(self.tree.get(parent)?);
        a.ino = INodeNo(ino);
        a.nlink = 2 + entries as u32;
        Some(a)
    }

    /// Attributes of a partition directory or file; None for other inodes.
    pub(super) fn part_attr(&self, ino: u64) -> Option<Result<FileAttr, Errno>> {
        if let Some(v) = self.parts.view(ino) {
            return Some(self.view_attr(&v).ok_or(Errno::ENOENT));
        }
        if Partitions::is_file_ino(ino) {
            return Some(Err(Errno::ENOENT));
        }
        let d = self.parts.dir(ino)?;
        Some(self.dir_attr(ino, d.views().len()).ok_or(Errno::ENOENT))
    }

    /// Look `name` up as a partition directory in `parent` or a partition file in a partition
    /// directory. Returns the attributes and the TTL to give them.
    pub(super) fn part_lookup(&self, parent: u64, name: &str) -> Option<FileAttr> {
        if let Some(d) = self.parts.dir(parent) {
            let number: u32 = name.strip_suffix(".raw")?.parse().ok()?;
            let v = d.views().into_iter().find(|v| v.part.number == number)?;
            if format!("{}.raw", v.part.number) != name {
                return None;
            }
            return self.view_attr(&v);
        }
        let d = self.parts.dir_named(parent, name)?;
        self.dir_attr(d.dir_ino, d.views().len())
    }

    /// Extra entries of directory `ino`: the partition directories beside the disk files in a tree
    /// directory, or the partition files of a partition directory.
    pub(super) fn part_entries(&self, ino: u64) -> Vec<(u64, FileType, String)> {
        if let Some(d) = self.parts.dir(ino) {
            return d
                .views()
                .iter()
                .map(|v| {
                    (
                        v.ino,
                        FileType::RegularFile,
                        format!("{}.raw", v.part.number),
                    )
                })
                .collect();
        }
        self.parts
            .dirs_in(ino)
            .into_iter()
            .map(|(ino, name)| (ino, FileType::Directory, name))
            .collect()
    }

    /// The parent of a partition directory (for its `..`).
    pub(super) fn part_dir_parent(&self, ino: u64) -> Option<u64> {
        self.parts.dir(ino).map(|d| d.parent)
    }

    /// `user.imgfs.partition.*` attributes of a partition file.
    pub(super) fn part_xattrs(&self, ino: u64) -> Option<Vec<(String, Vec<u8>)>> {
        let v = self.parts.view(ino)?;
        let disk = self.parts.disk_of(&v);
        let table = disk.table()?;
        let p = &v.part;
        let mut out = vec![
            ("number", p.number.to_string()),
            ("scheme", format!("{:?}", table.scheme).to_lowercase()),
            ("start", p.start.to_string()),
            ("size", p.len.to_string()),
            ("type", p.type_id.clone()),
            ("attributes", format!("{:#x}", p.attributes)),
        ];
        if let Some(g) = &p.guid {
            out.push(("uuid", g.clone()));
        }
        if let Some(n) = &p.name {
            out.push(("name", n.clone()));
        }
        Some(
            out.into_iter()
                .map(|(k, v)| (format!("user.imgfs.partition.{k}"), v.into_bytes()))
                .collect(),
        )
    }
}
