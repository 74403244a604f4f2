//! An instance's layer: its customizers' edits over a tree master, as the small tar a node
//! lays over the master it caches (overlayfs upper directory, or applied over links to the
//! master's files). Removals are OCI whiteouts; a directory that replaces one the master
//! had is opaque. Paths are resolved against the master and the edits before them as a
//! chroot would, so the layer names real paths only and never goes through a symlink.
//!
//! The layer holds what the edits wrote plus the directories above them (with the
//! master's modes and owners), nothing of the master's file data: its size is the edits'
//! plus a 512-byte header per entry.

use super::ImageError;
use super::archive::CANONICAL_MTIME;
use super::materialize::OverlayEdit;
use super::tree::{Kind, TreeIndex};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Node {
    Dir {
        mode: u32,
        uid: u32,
        gid: u32,
        opaque: bool,
    },
    File {
        mode: u32,
        uid: u32,
        gid: u32,
        data: Vec<u8>,
    },
    Symlink(String),
    Whiteout,
}

/// What a path is in the master with the edits so far laid over it.
enum Seen {
    Absent,
    Dir,
    Link(String),
    Other,
}

struct Builder<'a> {
    master: &'a TreeIndex,
    nodes: BTreeMap<String, Node>,
}

fn ancestors(key: &str) -> impl Iterator<Item = &str> {
    key.match_indices('/').map(move |(i, _)| &key[..i])
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Builder<'_> {
    /// Whether the master's entry at `key` still shows through the layer's ancestors.
    fn master_visible(&self, key: &str) -> bool {
        self.master.get(key).is_some()
            && !std::iter::once("")
                .chain(ancestors(key))
                .any(|a| match self.nodes.get(a) {
                    Some(Node::Dir { opaque, .. }) => *opaque,
                    Some(_) => true,
                    None => false,
                })
    }

    fn seen(&self, key: &str) -> Seen {
        match self.nodes.get(key) {
            Some(Node::Whiteout) => return Seen::Absent,
            Some(Node::Dir { .. }) => return Seen::Dir,
            Some(Node::Symlink(t)) => return Seen::Link(t.clone()),
            Some(Node::File { .. }) => return Seen::Other,
            None => {}
        }
        if !self.master_visible(key) {
            return Seen::Absent;
        }
        match self.master.get(key).map(|e| &e.kind) {
            Some(Kind::Dir) => Seen::Dir,
            Some(Kind::Symlink(t)) => Seen::Link(t.clone()),
            Some(_) => Seen::Other,
            None => Seen::Absent,
        }
    }

    /// The real directory an edit's path is in and its final name, resolving symlinks
    /// inside the image; missing directories on the way are created (0755, root) when
    /// `create`, else `None` is answered.
    fn parent(&mut self, path: &str, create: bool) -> Result<Option<(String, String)>, ImageError> {
        let bad = |m: &str| ImageError::Invalid(format!("edit path `{path}`: {m}"));
        let parts: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if !path.starts_with('/') || parts.contains(&"..") || path.contains('\0') {
            return Err(bad("must be absolute, without `..`"));
        }
        let Some((last, dirs)) = parts.split_last() else {
            return Err(bad("is the root"));
        };
        let mut pending: Vec<String> = dirs.iter().rev().map(|s| s.to_string()).collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(part) = pending.pop() {
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let key = join(&resolved.join("/"), &part);
            match self.seen(&key) {
                Seen::Link(target) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(bad("too many levels of symbolic links"));
                    }
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(target.split('/').rev().map(str::to_string));
                }
                Seen::Dir => resolved.push(part),
                Seen::Other => return Err(bad(&format!("`{part}` on the way is not a directory"))),
                Seen::Absent if !create => return Ok(None),
                Seen::Absent => {
                    let opaque = self.master.get(&key).is_some();
                    self.nodes.insert(
                        key,
                        Node::Dir {
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                            opaque,
                        },
                    );
                    resolved.push(part);
                }
            }
        }
        Ok(Some((resolved.join("/"), last.to_string())))
    }

    /// Removes `key` and everything under it: from the layer, and from the master by a
    /// whiteout where the master's entry shows through.
    fn remove(&mut self, key: &str) {
        let below = format!("{key}/");
        self.nodes.remove(key);
        let under: Vec<String> = self
            .nodes
            .range(below.clone()..)
            .take_while(|(k, _)| k.starts_with(&below))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.nodes.remove(&k);
        }
        if self.master_visible(key) {
            self.nodes.insert(key.to_string(), Node::Whiteout);
        }
    }

    fn apply(&mut self, e: &OverlayEdit) -> Result<(), ImageError> {
        use base64::Engine as _;
        match e {
            OverlayEdit::Write {
                path,
                mode,
                uid,
                gid,
                contents,
            } => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(contents)
                    .map_err(|_| {
                        ImageError::Invalid(format!("edit `{path}`: contents are not base64"))
                    })?;
                let Some((dir, name)) = self.parent(path, true)? else {
                    return Ok(());
                };
                let key = join(&dir, &name);
                self.remove(&key);
                self.nodes.insert(
                    key,
                    Node::File {
                        mode: *mode,
                        uid: *uid,
                        gid: *gid,
                        data,
                    },
                );
            }
            OverlayEdit::Remove { path } => {
                if let Some((dir, name)) = self.parent(path, false)? {
                    self.remove(&join(&dir, &name));
                }
            }
            OverlayEdit::Symlink { path, target } => {
                let Some((dir, name)) = self.parent(path, true)? else {
                    return Ok(());
                };
                let key = join(&dir, &name);
                self.remove(&key);
                self.nodes.insert(key, Node::Symlink(target.clone()));
            }
            OverlayEdit::Mkdir {
                path,
                mode,
                uid,
                gid,
            } => {
                let Some((dir, name)) = self.parent(path, true)? else {
                    return Ok(());
                };
                let key = join(&dir, &name);
                let (mode, uid, gid) = (*mode, *uid, *gid);
                match (self.seen(&key), self.nodes.get_mut(&key)) {
                    (
                        Seen::Dir,
                        Some(Node::Dir {
                            mode: m,
                            uid: u,
                            gid: g,
                            ..
                        }),
                    ) => (*m, *u, *g) = (mode, uid, gid),
                    (Seen::Dir, _) => {
                        self.nodes.insert(
                            key,
                            Node::Dir {
                                mode,
                                uid,
                                gid,
                                opaque: false,
                            },
                        );
                    }
                    _ => {
                        self.remove(&key);
                        let opaque = self.master.get(&key).is_some();
                        self.nodes.insert(
                            key,
                            Node::Dir {
                                mode,
                                uid,
                                gid,
                                opaque,
                            },
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// How an entry's name sorts among its siblings: an opaque marker first, then whiteouts,
/// then everything else by name, so a node applying the layer in order clears what is
/// hidden before it writes what replaces it.
fn sort_key(path: &str) -> Vec<(u8, &str)> {
    path.split('/')
        .map(|c| {
            let rank = if c == mint_layers::OPAQUE {
                0
            } else if c.starts_with(mint_layers::WHITEOUT_PREFIX) {
                1
            } else {
                2
            };
            (rank, c)
        })
        .collect()
}

fn header(kind: tar::EntryType, mode: u32, uid: u32, gid: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(CANONICAL_MTIME);
    h.set_size(size);
    h
}

/// The layer of `edits` over `master`, as tar bytes. The same edits over the same master
/// give the same bytes.
pub fn build(master: &TreeIndex, edits: &[OverlayEdit]) -> Result<Vec<u8>, ImageError> {
    let mut b = Builder {
        master,
        nodes: BTreeMap::new(),
    };
    for e in edits {
        b.apply(e)?;
    }
    // Every directory above an entry goes in too, with the master's metadata where the
    // layer did not make it, so an overlay's upper directory has the master's modes.
    let mut entries: BTreeMap<Vec<(u8, &str)>, (String, Option<&Node>)> = BTreeMap::new();
    let mut dirs_needed: BTreeSet<&str> = BTreeSet::new();
    for key in b.nodes.keys() {
        dirs_needed.extend(ancestors(key));
    }
    let mut markers: Vec<String> = Vec::new();
    for (key, node) in &b.nodes {
        match node {
            Node::Whiteout => {
                let (dir, name) = key.rsplit_once('/').unwrap_or(("", key));
                markers.push(join(
                    dir,
                    &format!("{}{name}", mint_layers::WHITEOUT_PREFIX),
                ));
            }
            Node::Dir { opaque: true, .. } => markers.push(join(key, mint_layers::OPAQUE)),
            _ => {}
        }
    }
    for key in b
        .nodes
        .keys()
        .filter(|k| !matches!(b.nodes.get(*k), Some(Node::Whiteout)))
    {
        entries.insert(sort_key(key), (key.clone(), b.nodes.get(key)));
    }
    for d in dirs_needed.iter().filter(|d| !b.nodes.contains_key(**d)) {
        entries.insert(sort_key(d), (d.to_string(), None));
    }
    for m in &markers {
        entries.insert(sort_key(m), (m.clone(), None));
    }
    let mut tar = tar::Builder::new(Vec::new());
    let add = |r: std::io::Result<()>, path: &str| {
        r.map_err(|e| ImageError::Invalid(format!("cannot write the layer entry `{path}`: {e}")))
    };
    for (path, node) in entries.values() {
        match node {
            Some(Node::File {
                mode,
                uid,
                gid,
                data,
            }) => {
                let mut h = header(
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    data.len() as u64,
                );
                let r = tar.append_data(&mut h, path, &data[..]);
                add(r, path)?;
            }
            Some(Node::Symlink(target)) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
                let r = tar.append_link(&mut h, path, target);
                add(r, path)?;
            }
            Some(Node::Dir { mode, uid, gid, .. }) => {
                let mut h = header(tar::EntryType::Directory, *mode, *uid, *gid, 0);
                let r = tar.append_data(&mut h, path, std::io::empty());
                add(r, path)?;
            }
            Some(Node::Whiteout) => {}
            None if path
                .rsplit('/')
                .next()
                .is_some_and(|n| n.starts_with(mint_layers::WHITEOUT_PREFIX)) =>
            {
                let mut h = header(tar::EntryType::Regular, 0, 0, 0, 0);
                let r = tar.append_data(&mut h, path, std::io::empty());
                add(r, path)?;
            }
            None => {
                let (mode, uid, gid) = master
                    .get(path)
                    .map(|e| (e.mode, e.uid, e.gid))
                    .unwrap_or((0o755, 0, 0));
                let mut h = header(tar::EntryType::Directory, mode, uid, gid, 0);
                let r = tar.append_data(&mut h, path, std::io::empty());
                add(r, path)?;
            }
        }
    }
    tar.into_inner()
        .map_err(|e| ImageError::Invalid(format!("cannot finish the layer: {e}")))
}
