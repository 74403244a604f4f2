//! A tree master read in place from its canonical tar: an index of every entry (kind,
//! mode, owner, where its data starts), so customizers read the master's files and the
//! engine computes instance layers without an unpacked copy of the master on disk.
//!
//! The canonical tar is plain and every file is stored whole, so a file's bytes are one
//! contiguous range of the tar: reading one is a seek and a read.

use super::{ImageError, io};
use mint_plugins::bindings::customizer::mint::plugin::master::{
    DirEntry, FileKind, FileStat, FsError,
};
use mint_plugins::master::{Lookup, MAX_READ_BYTES, MasterView, resolve_in};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// What an entry of a tree master is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symlink, with its target as written.
    Symlink(String),
    /// A device node or FIFO.
    Special,
}

/// One entry of a tree master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Length of a file's data.
    pub size: u64,
    /// Where a file's data starts in the tar.
    pub offset: u64,
}

/// The index of a tree master's canonical tar, keyed by path without a leading `/` (the
/// root is `""`).
#[derive(Debug)]
pub struct TreeIndex {
    tar: PathBuf,
    entries: BTreeMap<String, Entry>,
}

fn key(parts: &[String]) -> String {
    parts.join("/")
}

impl TreeIndex {
    /// Reads the index of the canonical tar at `tar`, skipping over every file's data.
    pub fn read(tar: &Path) -> Result<TreeIndex, ImageError> {
        let file =
            std::fs::File::open(tar).map_err(io(format!("cannot open {}", tar.display())))?;
        let mut a = tar::Archive::new(std::io::BufReader::new(file));
        let mut entries = BTreeMap::new();
        entries.insert(
            String::new(),
            Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                offset: 0,
            },
        );
        let bad = |e: std::io::Error| {
            ImageError::Invalid(format!(
                "the master {} is not a readable tar: {e}",
                tar.display()
            ))
        };
        for e in a.entries_with_seek().map_err(bad)? {
            let e = e.map_err(bad)?;
            let h = e.header();
            let path = e
                .path()
                .map_err(bad)?
                .to_string_lossy()
                .trim_end_matches('/')
                .trim_start_matches("./")
                .to_string();
            let kind = match h.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => Kind::Symlink(
                    e.link_name()
                        .map_err(bad)?
                        .map(|l| l.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                ),
                tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo => {
                    Kind::Special
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                _ => continue,
            };
            let entry = Entry {
                kind,
                mode: h.mode().unwrap_or(0) & 0o7777,
                uid: h.uid().unwrap_or(0) as u32,
                gid: h.gid().unwrap_or(0) as u32,
                size: h.size().unwrap_or(0),
                offset: e.raw_file_position(),
            };
            if entry.kind == Kind::Dir && path.is_empty() {
                entries.insert(String::new(), entry);
            } else if !path.is_empty() {
                entries.insert(path, entry);
            }
        }
        Ok(TreeIndex {
            tar: tar.to_path_buf(),
            entries,
        })
    }

    /// The entry at `path` (no leading `/`), not following symlinks.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// The names of `dir`'s children with their entries, sorted.
    pub fn children<'a>(&'a self, dir: &str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        // Keys under `dir/` are contiguous in string order from `dir/` on (`etc-x` sorts
        // between `etc` and `etc/`, so the range starts at the prefix, not at `dir`).
        self.entries
            .range(prefix.clone()..)
            .take_while({
                let prefix = prefix.clone();
                move |(k, _)| k.starts_with(&prefix)
            })
            .filter_map(move |(k, e)| {
                let rest = &k[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then_some((rest, e))
            })
    }

    /// Every entry, by path.
    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// The bytes of a file entry.
    pub fn read_data(&self, e: &Entry) -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(&self.tar)?;
        f.seek(SeekFrom::Start(e.offset))?;
        let mut out = Vec::with_capacity(e.size as usize);
        f.take(e.size).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Resolves an image path to the real path it names (symlinks followed inside the
    /// image), or none when some part of it does not exist.
    pub fn resolve(&self, path: &str, follow_final: bool) -> Result<Option<String>, FsError> {
        Ok(resolve_in(path, follow_final, |parts| {
            Ok(match self.entries.get(&key(parts)) {
                None => Lookup::Absent,
                Some(Entry {
                    kind: Kind::Symlink(t),
                    ..
                }) => Lookup::Link(t.clone()),
                Some(_) => Lookup::Other,
            })
        })?
        .map(|parts| key(&parts)))
    }
}

fn file_kind(k: &Kind) -> FileKind {
    match k {
        Kind::File => FileKind::File,
        Kind::Dir => FileKind::Directory,
        Kind::Symlink(_) => FileKind::Symlink,
        Kind::Special => FileKind::Other,
    }
}

/// The customizers' read-only view of a tree master, served from its index.
pub struct TarMaster(pub std::sync::Arc<TreeIndex>);

impl MasterView for TarMaster {
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError> {
        let Some(p) = self.0.resolve(path, false)? else {
            return Ok(None);
        };
        Ok(self.0.get(&p).map(|e| FileStat {
            kind: file_kind(&e.kind),
            size: if let Kind::Symlink(t) = &e.kind {
                t.len() as u64
            } else {
                e.size
            },
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
        }))
    }

    fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError> {
        let Some(p) = self.0.resolve(path, true)? else {
            return Ok(None);
        };
        let Some(e) = self.0.get(&p) else {
            return Ok(None);
        };
        match e.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::WrongKind(format!("`{path}` is a directory"))),
            _ => {
                return Err(FsError::WrongKind(format!(
                    "`{path}` is not a regular file"
                )));
            }
        }
        if e.size > max_bytes.min(MAX_READ_BYTES) {
            return Err(FsError::TooLarge(e.size));
        }
        self.0
            .read_data(e)
            .map(Some)
            .map_err(|e| FsError::Io(e.to_string()))
    }

    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError> {
        let Some(p) = self.0.resolve(path, true)? else {
            return Ok(None);
        };
        match self.0.get(&p) {
            None => Ok(None),
            Some(Entry {
                kind: Kind::Dir, ..
            }) => Ok(Some(
                self.0
                    .children(&p)
                    .map(|(name, e)| DirEntry {
                        name: name.to_string(),
                        kind: file_kind(&e.kind),
                    })
                    .collect(),
            )),
            Some(_) => Err(FsError::WrongKind(format!("`{path}` is not a directory"))),
        }
    }

    fn read_link(&self, path: &str) -> Result<Option<String>, FsError> {
        let Some(p) = self.0.resolve(path, false)? else {
            return Ok(None);
        };
        Ok(match self.0.get(&p) {
            Some(Entry {
                kind: Kind::Symlink(t),
                ..
            }) => Some(t.clone()),
            _ => None,
        })
    }
}
