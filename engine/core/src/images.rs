//! The image store: master images as content-addressed canonical tar archives, each also
//! unpacked as a directory that customizers read through the plugin host's master view.
//!
//! A canonical tar lists entries sorted by path with fixed owner, group and times taken
//! from the source, so the same tree imported twice (from a directory or from any tar of
//! it) gets the same digest.

use crate::{Report, Step};
use mint_model::records::Image;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Why an image could not be imported. Nothing is kept of a failed import.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The source is unusable; the message says why and what to do.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |source| ImageError::Io { what, source }
}

/// Where images live: `<dir>/<hex>.tar` and `<dir>/<hex>/`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// An image store rooted at `dir`, created if needed.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        std::fs::create_dir_all(dir).map_err(io(format!("cannot create image directory {}", dir.display())))?;
        Ok(ImageStore { dir: dir.to_path_buf() })
    }

    /// The unpacked tree of an image, for reading its files.
    pub fn tree(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.trim_start_matches("sha256:"))
    }

    /// Imports a directory or a plain tar archive holding a root filesystem.
    /// Progress goes to `report`: `reading` a tar source, `hashing` the canonical tar entry
    /// by entry, then `unpacking` the stored tree.
    pub fn import(&self, source: &Path, name: Option<&str>, report: Report<'_>) -> Result<Image, ImageError> {
        let meta = std::fs::metadata(source).map_err(io(format!("cannot read {}", source.display())))?;
        let staging = tempdir_in(&self.dir)?;
        let tree = if meta.is_dir() {
            source.to_path_buf()
        } else {
            report(Step { phase: "reading", done: 0, total: 0 });
            unpack_checked(source, &staging.0.join("tree"))?;
            staging.0.join("tree")
        };
        let tar_tmp = staging.0.join("image.tar");
        let (digest, size, entries) = write_canonical_tar(&tree, &tar_tmp, report)?;
        let hex = digest.trim_start_matches("sha256:").to_string();
        let final_tar = self.dir.join(format!("{hex}.tar"));
        let final_tree = self.dir.join(&hex);
        if !final_tree.exists() {
            report(Step { phase: "unpacking", done: 0, total: 0 });
            let unpack_tmp = staging.0.join("unpacked");
            unpack_checked(&tar_tmp, &unpack_tmp)?;
            std::fs::rename(&tar_tmp, &final_tar).map_err(io("cannot store the image"))?;
            std::fs::rename(&unpack_tmp, &final_tree).map_err(io("cannot store the image tree"))?;
        }
        let name = name.map(str::to_string).unwrap_or_else(|| {
            source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
        });
        Ok(Image { digest, name, format: "tree".into(), size, entries })
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(dir: &Path) -> Result<TempDir, ImageError> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let p = dir.join(format!(".import-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(io("cannot create a staging directory"))?;
    Ok(TempDir(p))
}

/// Unpacks a tar after checking every entry stays inside the root: no absolute paths,
/// no `..`, no link whose target leaves the tree.
fn unpack_checked(archive: &Path, into: &Path) -> Result<(), ImageError> {
    let open = || std::fs::File::open(archive).map_err(io(format!("cannot open {}", archive.display())));
    let mut check = tar::Archive::new(open()?);
    let entries = check.entries().map_err(|e| ImageError::Invalid(format!("{} is not a tar archive: {e}", archive.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::Invalid(format!("{} is truncated or not a tar archive: {e}", archive.display())))?;
        let path = entry.path().map_err(|e| ImageError::Invalid(format!("an entry has an unreadable path: {e}")))?.into_owned();
        if path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_))) {
            return Err(ImageError::Invalid(format!("entry `{}` is absolute or climbs out with `..`; refusing the archive", path.display())));
        }
        if let Ok(Some(target)) = entry.link_name() {
            let kind = entry.header().entry_type();
            let base = if kind.is_hard_link() { Path::new("") } else { path.parent().unwrap_or(Path::new("")) };
            let mut depth: i64 = 0;
            let absolute = target.is_absolute();
            for c in base.join(&target).components() {
                match c {
                    Component::ParentDir => depth -= 1,
                    Component::Normal(_) => depth += 1,
                    _ => {}
                }
                if depth < 0 && !absolute {
                    return Err(ImageError::Invalid(format!(
                        "link `{}` -> `{}` escapes the root; refusing the archive",
                        path.display(),
                        target.display()
                    )));
                }
            }
            if kind.is_hard_link() && absolute {
                return Err(ImageError::Invalid(format!("hard link `{}` has an absolute target", path.display())));
            }
        }
    }
    std::fs::create_dir_all(into).map_err(io("cannot create the unpack directory"))?;
    let mut a = tar::Archive::new(open()?);
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    a.unpack(into).map_err(|e| ImageError::Invalid(format!("cannot unpack {}: {e}", archive.display())))
}

/// Writes the canonical tar of `root` to `out`; returns its digest, size and entry count.
fn write_canonical_tar(root: &Path, out: &Path, report: Report<'_>) -> Result<(String, u64, u64), ImageError> {
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    paths.sort();
    let file = std::fs::File::create(out).map_err(io("cannot write the image"))?;
    let mut b = tar::Builder::new(HashingWriter { inner: file, hash: Sha256::new(), size: 0 });
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let total = paths.len() as u64;
    for (i, rel) in paths.iter().enumerate() {
        let full = root.join(rel);
        b.append_path_with_name(&full, rel).map_err(io(format!("cannot add {}", rel.display())))?;
        report(Step { phase: "hashing", done: i as u64 + 1, total });
    }
    let mut w = b.into_inner().map_err(io("cannot finish the image"))?;
    w.flush().map_err(io("cannot flush the image"))?;
    Ok((format!("sha256:{}", hex::encode(w.hash.finalize())), w.size, paths.len() as u64))
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    let dir = root.join(rel);
    for e in std::fs::read_dir(&dir).map_err(io(format!("cannot list {}", dir.display())))? {
        let e = e.map_err(io("cannot list"))?;
        let r = rel.join(e.file_name());
        let m = e.path().symlink_metadata().map_err(io("cannot stat"))?;
        out.push(r.clone());
        if m.is_dir() {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

struct HashingWriter {
    inner: std::fs::File,
    hash: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
