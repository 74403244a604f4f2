//! Tar archives as masters come in: decompressing gzip and zstd, checking every entry stays
//! inside the root before anything is written, unpacking, and writing the canonical tar
//! whose sha256 names a tree image.

use super::{ImageError, io};
use crate::{Report, Step};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

/// How a tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar.
    None,
    /// gzip (`.tar.gz`, `.tgz`, OCI `+gzip` layers).
    Gzip,
    /// zstd (`.tar.zst`, OCI `+zstd` layers).
    Zstd,
}

/// Opens `path` as a decompressed tar stream.
pub fn open(path: &Path, compression: Compression) -> Result<Box<dyn Read>, ImageError> {
    let file = std::fs::File::open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let file = std::io::BufReader::with_capacity(1 << 16, file);
    Ok(match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        Compression::Zstd => Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| ImageError::Invalid(format!("{} is not a zstd stream: {e}", path.display())))?,
        ),
    })
}

/// Decompresses `path` into a plain tar at `out`, so that it can be read twice (checked,
/// then unpacked). A truncated or corrupt stream is refused.
pub fn decompress(path: &Path, compression: Compression, out: &Path) -> Result<(), ImageError> {
    let mut r = open(path, compression)?;
    let mut w = std::fs::File::create(out).map_err(io("cannot write a staging file"))?;
    std::io::copy(&mut r, &mut w)
        .map_err(|e| ImageError::Invalid(format!("{} is truncated or corrupt ({compression:?}): {e}", path.display())))?;
    Ok(())
}

/// Whether a path from an archive stays inside its root: relative, without `..`.
pub fn check_path(path: &Path) -> Result<(), ImageError> {
    if path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_))) {
        return Err(ImageError::Invalid(format!("entry `{}` is absolute or climbs out with `..`; refusing the archive", path.display())));
    }
    Ok(())
}

/// Whether a link entry's target stays inside the root. A symlink's target is read from
/// the link's directory; an absolute symlink target is fine (it is resolved inside the
/// image when the image is used); a hard link's target must be a relative path in the
/// archive.
pub fn check_link(entry: &tar::Entry<'_, impl Read>, path: &Path) -> Result<(), ImageError> {
    let Ok(Some(target)) = entry.link_name() else { return Ok(()) };
    let kind = entry.header().entry_type();
    let base = if kind.is_hard_link() { Path::new("") } else { path.parent().unwrap_or(Path::new("")) };
    if kind.is_hard_link() && target.is_absolute() {
        return Err(ImageError::Invalid(format!("hard link `{}` has an absolute target", path.display())));
    }
    if target.is_absolute() {
        return Ok(());
    }
    let mut depth: i64 = 0;
    for c in base.join(&target).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(ImageError::Invalid(format!("link `{}` -> `{}` escapes the root; refusing the archive", path.display(), target.display())));
        }
    }
    Ok(())
}

/// Checks every entry of a plain tar (paths and link targets) without writing anything.
pub fn check_all(archive: &Path) -> Result<(), ImageError> {
    let mut a = tar::Archive::new(open(archive, Compression::None)?);
    let entries = a.entries().map_err(|e| ImageError::Invalid(format!("{} is not a tar archive: {e}", archive.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImageError::Invalid(format!("{} is truncated or not a tar archive: {e}", archive.display())))?;
        let path = entry.path().map_err(|e| ImageError::Invalid(format!("an entry has an unreadable path: {e}")))?.into_owned();
        check_path(&path)?;
        check_link(&entry, &path)?;
    }
    Ok(())
}

/// Unpacks a plain tar after [`check_all`] accepted every entry.
pub fn unpack_checked(archive: &Path, into: &Path) -> Result<(), ImageError> {
    check_all(archive)?;
    std::fs::create_dir_all(into).map_err(io("cannot create the unpack directory"))?;
    let mut a = tar::Archive::new(open(archive, Compression::None)?);
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    a.unpack(into).map_err(|e| ImageError::Invalid(format!("cannot unpack {}: {e}", archive.display())))
}

/// Writes the canonical tar of `root` to `out`; returns its digest, size and entry count.
/// Entries are sorted by path with deterministic owners and times, so the same tree gives
/// the same bytes however it arrived.
pub fn write_canonical(root: &Path, out: &Path, report: Report<'_>) -> Result<(String, u64, u64), ImageError> {
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    paths.sort();
    let file = std::fs::File::create(out).map_err(io("cannot write the image"))?;
    let mut b = tar::Builder::new(HashingWriter::new(std::io::BufWriter::with_capacity(1 << 16, file)));
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
    let (digest, size) = w.finish();
    Ok((digest, size, total))
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

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hash: Sha256::new(), size: 0 }
    }
    /// The `sha256:<hex>` digest and the byte count of everything written.
    pub fn finish(self) -> (String, u64) {
        (format!("sha256:{}", hex::encode(self.hash.finalize())), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
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
