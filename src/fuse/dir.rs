//! The exposed tree: names <-> inodes <-> images. Built once at mount time and never changed.
//!
//! ```text
//!   /                      ino 1
//!   ├── disk.raw           one file per image (<stem>.raw, or <name>.raw on a stem clash)
//!   └── disk.snapshots/    only for images with internal snapshots
//!       └── snap1.raw      read-only view of each snapshot
//! ```

use crate::image::Image;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub const ROOT: u64 = 1;

pub enum NodeKind {
    Dir { children: Vec<u64> },
    File { image: Arc<Image> },
}

pub struct Node {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    pub kind: NodeKind,
}

pub struct Tree {
    nodes: Vec<Node>,
    by_parent_name: HashMap<(u64, String), u64>,
}

impl Tree {
    /// Lay out `images` (already open) with their snapshot directories.
    pub fn build(images: Vec<Arc<Image>>) -> Tree {
        let mut tree = Tree {
            nodes: vec![Node {
                ino: ROOT,
                parent: ROOT,
                name: String::new(),
                kind: NodeKind::Dir {
                    children: Vec::new(),
                },
            }],
            by_parent_name: HashMap::new(),
        };
        let names = exposed_names(images.iter().map(|i| i.path()));
        for (image, (stem_name, base)) in images.into_iter().zip(names) {
            let snaps = image.snapshots();
            tree.add(
                ROOT,
                stem_name,
                NodeKind::File {
                    image: image.clone(),
                },
            );
            if snaps.is_empty() {
                continue;
            }
            let dir = tree.add(
                ROOT,
                format!("{base}.snapshots"),
                NodeKind::Dir {
                    children: Vec::new(),
                },
            );
            for s in snaps {
                match image.open_snapshot(&s.id) {
                    Ok(view) => {
                        let name = format!("{}.raw", s.name.replace('/', "_"));
                        tree.add(
                            dir,
                            name,
                            NodeKind::File {
                                image: Arc::new(view),
                            },
                        );
                    }
                    Err(e) => log::warn!(
                        "{}: snapshot {:?} not exposed: {e}",
                        image.path().display(),
                        s.name
                    ),
                }
            }
        }
        tree
    }

    fn add(&mut self, parent: u64, name: String, kind: NodeKind) -> u64 {
        let mut name = name;
        while self.by_parent_name.contains_key(&(parent, name.clone())) {
            name.insert(0, '_');
        }
        let ino = self.nodes.len() as u64 + 1;
        self.nodes.push(Node {
            ino,
            parent,
            name: name.clone(),
            kind,
        });
        self.by_parent_name.insert((parent, name), ino);
        if let NodeKind::Dir { children } = &mut self.nodes[parent as usize - 1].kind {
            children.push(ino);
        }
        ino
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Option<&Node> {
        self.by_parent_name
            .get(&(parent, name.to_string()))
            .and_then(|&ino| self.get(ino))
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// Every image exposed at the top level (not snapshot views).
    pub fn top_images(&self) -> impl Iterator<Item = (&str, &Arc<Image>)> {
        self.nodes.iter().filter_map(|n| match &n.kind {
            NodeKind::File { image } if n.parent == ROOT => Some((n.name.as_str(), image)),
            _ => None,
        })
    }
}

/// `<stem>.raw` for each path, or `<file name>.raw` where two share a stem. Also returns the
/// base used for the snapshot directory.
pub fn exposed_names<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<(String, String)> {
    let paths: Vec<&Path> = paths.collect();
    let stem = |p: &Path| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    let full = |p: &Path| {
        p.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    let mut count: HashMap<String, usize> = HashMap::new();
    for p in &paths {
        *count.entry(stem(p)).or_default() += 1;
    }
    paths
        .iter()
        .map(|p| {
            let base = if count[&stem(p)] > 1 {
                full(p)
            } else {
                stem(p)
            };
            (format!("{base}.raw"), base)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_stem_unless_it_clashes() {
        let paths = [
            Path::new("/a/disk.qcow2"),
            Path::new("/a/disk.vhdx"),
            Path::new("/b/other.img"),
            Path::new("/b/plain"),
        ];
        let names: Vec<String> = exposed_names(paths.iter().copied())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            ["disk.qcow2.raw", "disk.vhdx.raw", "other.raw", "plain.raw"]
        );
    }
}
