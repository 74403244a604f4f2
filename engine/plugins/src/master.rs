//! The read-only view of a master image that customizers get through the `master` WIT
//! interface. Paths are resolved inside the image root, following symlinks the way the
//! instance will see them once booted: an absolute link target is re-rooted at the image,
//! and `..` never climbs above the image's `/`.

use crate::bindings::customizer::mint::plugin::master::{DirEntry, FileKind, FileStat, FsError};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The host's cap on one file read, whatever a plugin asks.
pub const MAX_READ_BYTES: u64 = 1 << 20;

/// What a customizer may read of a master image.
pub trait MasterView: Send + Sync {
    /// Metadata of `path`, not following a final symlink.
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError>;
    /// Contents of `path`, following symlinks, at most `max_bytes`.
    fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError>;
    /// Entries of directory `path`, sorted by name.
    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError>;
    /// Target of symlink `path`.
    fn read_link(&self, path: &str) -> Result<Option<String>, FsError>;
}

/// A master image unpacked in a host directory.
#[derive(Debug, Clone)]
pub struct DirMaster {
    root: PathBuf,
}

/// An image with no files at all (for plugins run without a master).
#[derive(Debug, Clone, Default)]
pub struct EmptyMaster;

impl MasterView for EmptyMaster {
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError> {
        components(path).map(|_| None)
    }
    fn read_file(&self, path: &str, _: u64) -> Result<Option<Vec<u8>>, FsError> {
        components(path).map(|_| None)
    }
    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError> {
        components(path).map(|_| None)
    }
    fn read_link(&self, path: &str) -> Result<Option<String>, FsError> {
        components(path).map(|_| None)
    }
}

fn components(path: &str) -> Result<Vec<&str>, FsError> {
    if !path.starts_with('/') {
        return Err(FsError::InvalidPath(format!("`{path}` is not absolute")));
    }
    if path.contains('\0') {
        return Err(FsError::InvalidPath("the path holds a NUL byte".into()));
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(FsError::InvalidPath(format!("`{path}` holds `..`")));
    }
    Ok(parts)
}

/// What a path of an image is, as far as resolving it goes.
pub enum Lookup {
    /// Nothing is there.
    Absent,
    /// A symlink, with its target as written.
    Link(String),
    /// Anything else.
    Other,
}

/// Resolves an image path to the components of the real path it names inside the image,
/// following symlinks the way the instance will once booted: an absolute target re-roots
/// at the image and `..` never climbs above its `/`. `lstat` says what a real path (as
/// components) is. `None` when some part of the path does not exist.
pub fn resolve_in(
    path: &str,
    follow_final: bool,
    lstat: impl Fn(&[String]) -> Result<Lookup, FsError>,
) -> Result<Option<Vec<String>>, FsError> {
    let mut pending: Vec<String> = components(path)?
        .into_iter()
        .rev()
        .map(str::to_string)
        .collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        resolved.push(part);
        let last = pending.is_empty();
        match lstat(&resolved)? {
            Lookup::Absent => return Ok(None),
            Lookup::Link(target) if !last || follow_final => {
                hops += 1;
                if hops > 40 {
                    return Err(FsError::InvalidPath(format!(
                        "`{path}`: too many levels of symbolic links"
                    )));
                }
                resolved.pop();
                if target.starts_with('/') {
                    resolved.clear();
                }
                pending.extend(target.split('/').rev().map(str::to_string));
            }
            _ => {}
        }
    }
    Ok(Some(resolved))
}

fn kind_of(m: &std::fs::Metadata) -> FileKind {
    let t = m.file_type();
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Directory
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

fn io(e: std::io::Error) -> FsError {
    FsError::Io(e.to_string())
}

impl DirMaster {
    /// A view of the image rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Resolves an image path to a host path inside the root, or none when some part of it
    /// does not exist.
    fn resolve(&self, path: &str, follow_final: bool) -> Result<Option<PathBuf>, FsError> {
        let found = resolve_in(path, follow_final, |parts| {
            let candidate = self.host_path(parts);
            match std::fs::symlink_metadata(&candidate) {
                Ok(m) if m.file_type().is_symlink() => Ok(Lookup::Link(
                    std::fs::read_link(&candidate)
                        .map_err(io)?
                        .to_string_lossy()
                        .into_owned(),
                )),
                Ok(_) => Ok(Lookup::Other),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lookup::Absent),
                Err(e) if e.raw_os_error() == Some(20) => Ok(Lookup::Absent), // ENOTDIR
                Err(e) => Err(io(e)),
            }
        })?;
        Ok(found.map(|parts| self.host_path(&parts)))
    }

    fn host_path(&self, parts: &[String]) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(parts);
        p
    }
}

impl MasterView for DirMaster {
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError> {
        let Some(p) = self.resolve(path, false)? else {
            return Ok(None);
        };
        match std::fs::symlink_metadata(&p) {
            Ok(m) => Ok(Some(FileStat {
                kind: kind_of(&m),
                size: m.len(),
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError> {
        let Some(p) = self.resolve(path, true)? else {
            return Ok(None);
        };
        let m = std::fs::metadata(&p).map_err(io)?;
        if m.is_dir() {
            return Err(FsError::WrongKind(format!("`{path}` is a directory")));
        }
        if !m.is_file() {
            return Err(FsError::WrongKind(format!(
                "`{path}` is not a regular file"
            )));
        }
        let cap = max_bytes.min(MAX_READ_BYTES);
        if m.len() > cap {
            return Err(FsError::TooLarge(m.len()));
        }
        std::fs::read(&p).map(Some).map_err(io)
    }

    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError> {
        let Some(p) = self.resolve(path, true)? else {
            return Ok(None);
        };
        if !p.is_dir() {
            return Err(FsError::WrongKind(format!("`{path}` is not a directory")));
        }
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&p).map_err(io)? {
            let e = e.map_err(io)?;
            let m = e.metadata().map_err(io)?;
            entries.push(DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind: kind_of(&m),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(entries))
    }

    fn read_link(&self, path: &str) -> Result<Option<String>, FsError> {
        let Some(p) = self.resolve(path, false)? else {
            return Ok(None);
        };
        match std::fs::read_link(&p) {
            Ok(t) => Ok(Some(t.to_string_lossy().into_owned())),
            Err(_) => Ok(None),
        }
    }
}

/// The root directory of a `DirMaster`, for messages.
impl AsRef<Path> for DirMaster {
    fn as_ref(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_the_image() {
        let dir = std::env::temp_dir().join(format!("mint-master-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hostname"), "master\n").unwrap();
        // An absolute link re-roots at the image; a relative one climbing past `/` stops there.
        symlink("/etc/hostname", dir.join("abs")).unwrap();
        symlink("../../../../etc/hostname", dir.join("etc/rel")).unwrap();
        symlink("/etc/passwd", dir.join("etc/escape")).unwrap();
        let m = DirMaster::new(&dir);
        assert_eq!(m.read_file("/abs", 100).unwrap().unwrap(), b"master\n");
        assert_eq!(m.read_file("/etc/rel", 100).unwrap().unwrap(), b"master\n");
        // /etc/passwd of the host must not be reachable: the image has none.
        assert_eq!(m.read_file("/etc/escape", 100).unwrap(), None);
        assert_eq!(m.stat("/abs").unwrap().unwrap().kind, FileKind::Symlink);
        assert_eq!(m.read_link("/abs").unwrap().unwrap(), "/etc/hostname");
        assert!(matches!(
            m.read_file("/etc/hostname", 3),
            Err(FsError::TooLarge(7))
        ));
        assert!(matches!(
            m.read_file("etc/hostname", 100),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(
            m.read_file("/etc/../etc/hostname", 100),
            Err(FsError::InvalidPath(_))
        ));
        assert!(matches!(
            m.read_file("/etc", 100),
            Err(FsError::WrongKind(_))
        ));
        let names: Vec<_> = m
            .list_dir("/etc")
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["escape", "hostname", "rel"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
