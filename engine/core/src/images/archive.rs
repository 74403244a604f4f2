//! Tar archives as masters come in: decompressing gzip and zstd, checking every entry stays
//! inside the root before anything is written, unpacking, and writing the canonical tar
//! whose sha256 names a tree image.

use super::{ImageError, io};
use crate::{Report, Step};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

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
        Compression::Zstd => {
            Box::new(ruzstd::decoding::StreamingDecoder::new(file).map_err(|e| {
                ImageError::Invalid(format!("{} is not a zstd stream: {e}", path.display()))
            })?)
        }
    })
}

/// Decompresses `path` into a plain tar at `out`, so that it can be read twice (checked,
/// then unpacked). A truncated or corrupt stream is refused.
pub fn decompress(path: &Path, compression: Compression, out: &Path) -> Result<(), ImageError> {
    let mut r = open(path, compression)?;
    let mut w = std::fs::File::create(out).map_err(io("cannot write a staging file"))?;
    std::io::copy(&mut r, &mut w).map_err(|e| {
        ImageError::Invalid(format!(
            "{} is truncated or corrupt ({compression:?}): {e}",
            path.display()
        ))
    })?;
    Ok(())
}

/// Whether a path from an archive stays inside its root: relative, without `..`.
pub fn check_path(path: &Path) -> Result<(), ImageError> {
    mint_layers::check_path(path).map_err(layer_error)
}

/// Whether a link entry's target stays inside the root (see [`mint_layers::check_link`]).
pub fn check_link(entry: &tar::Entry<'_, impl Read>, path: &Path) -> Result<(), ImageError> {
    mint_layers::check_link(entry, path).map_err(layer_error)
}

pub(crate) fn layer_error(e: mint_layers::LayerError) -> ImageError {
    match e {
        mint_layers::LayerError::Invalid(m) => ImageError::Invalid(m),
        mint_layers::LayerError::Io { what, source } => ImageError::Io { what, source },
    }
}

/// Checks every entry of a plain tar (paths and link targets) without writing anything.
pub fn check_all(archive: &Path) -> Result<(), ImageError> {
    let mut a = tar::Archive::new(open(archive, Compression::None)?);
    let entries = a.entries().map_err(|e| {
        ImageError::Invalid(format!("{} is not a tar archive: {e}", archive.display()))
    })?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            ImageError::Invalid(format!(
                "{} is truncated or not a tar archive: {e}",
                archive.display()
            ))
        })?;
        let path = entry
            .path()
            .map_err(|e| ImageError::Invalid(format!("an entry has an unreadable path: {e}")))?
            .into_owned();
        check_path(&path)?;
        check_link(&entry, &path)?;
    }
    Ok(())
}

/// Unpacks a plain tar after [`check_all`] accepted every entry. Device nodes and FIFOs
/// are created as what they are; one this process may not create refuses the import,
/// since the master would silently lose it.
pub fn unpack_checked(archive: &Path, into: &Path) -> Result<(), ImageError> {
    check_all(archive)?;
    let u = mint_layers::unpack(
        open(archive, Compression::None)?,
        into,
        mint_layers::Whiteouts::Keep,
    )
    .map_err(|e| {
        ImageError::Invalid(format!(
            "cannot unpack {}: {}",
            archive.display(),
            layer_error(e)
        ))
    })?;
    if let Some(w) = u.warnings.first() {
        return Err(ImageError::Invalid(format!(
            "{}: {w}; import masters with device nodes as root, or remove them from the archive",
            archive.display()
        )));
    }
    Ok(())
}

/// The modification time every entry of a canonical tar carries, so the same tree gives
/// the same bytes whenever it was unpacked.
pub const CANONICAL_MTIME: u64 = 1_153_704_088;

/// The canonical header of `meta`: its type, permission bits (setuid, setgid and sticky
/// included), owner and size, with a fixed time and no user or group names.
pub fn canonical_header(meta: &std::fs::Metadata) -> tar::Header {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut h = tar::Header::new_gnu();
    let t = meta.file_type();
    h.set_entry_type(if t.is_dir() {
        tar::EntryType::Directory
    } else if t.is_symlink() {
        tar::EntryType::Symlink
    } else if t.is_block_device() {
        tar::EntryType::Block
    } else if t.is_char_device() {
        tar::EntryType::Char
    } else if t.is_fifo() {
        tar::EntryType::Fifo
    } else {
        tar::EntryType::Regular
    });
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(CANONICAL_MTIME);
    h.set_size(if t.is_file() { meta.len() } else { 0 });
    if t.is_block_device() || t.is_char_device() {
        let rdev = meta.rdev();
        // The same split of a device number as glibc's major() and minor().
        let _ = h.set_device_major(libc::major(rdev));
        let _ = h.set_device_minor(libc::minor(rdev));
    }
    h
}

/// Writes the canonical tar of `root` to `out`; returns its digest, size and entry count.
/// Entries are sorted by path with their modes and owners and a fixed time, so the same
/// tree gives the same bytes however it arrived. Device nodes and FIFOs are kept as what
/// they are; sockets are not part of an image and are left out.
pub fn write_canonical(
    root: &Path,
    out: &Path,
    report: Report<'_>,
) -> Result<(String, u64, u64), ImageError> {
    use std::os::unix::fs::FileTypeExt;
    let mut paths = Vec::new();
    walk(root, Path::new(""), &mut paths)?;
    paths.sort();
    let file = std::fs::File::create(out).map_err(io("cannot write the image"))?;
    let mut b = tar::Builder::new(HashingWriter::new(std::io::BufWriter::with_capacity(
        1 << 16,
        file,
    )));
    let total = paths.len() as u64;
    let mut written = 0;
    for (i, rel) in paths.iter().enumerate() {
        let full = root.join(rel);
        let meta = full
            .symlink_metadata()
            .map_err(io(format!("cannot stat {}", rel.display())))?;
        let t = meta.file_type();
        let mut h = canonical_header(&meta);
        let added = if t.is_socket() {
            report(Step {
                phase: "hashing",
                done: i as u64 + 1,
                total,
            });
            continue;
        } else if t.is_symlink() {
            let target = std::fs::read_link(&full)
                .map_err(io(format!("cannot read the link {}", rel.display())))?;
            b.append_link(&mut h, rel, target)
        } else if t.is_file() {
            let f =
                std::fs::File::open(&full).map_err(io(format!("cannot read {}", rel.display())))?;
            b.append_data(&mut h, rel, f)
        } else {
            b.append_data(&mut h, rel, std::io::empty())
        };
        added.map_err(io(format!("cannot add {}", rel.display())))?;
        written += 1;
        report(Step {
            phase: "hashing",
            done: i as u64 + 1,
            total,
        });
    }
    let mut w = b.into_inner().map_err(io("cannot finish the image"))?;
    w.flush().map_err(io("cannot flush the image"))?;
    let (digest, size) = w.finish();
    Ok((digest, size, written))
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
        HashingWriter {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }
    /// The `sha256:<hex>` digest and the byte count of everything written.
    pub fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hash.finalize())),
            self.size,
        )
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
