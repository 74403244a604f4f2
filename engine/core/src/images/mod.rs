//! The image store: master images, content-addressed by sha256.
//!
//! Tree masters (a directory, a tar archive plain, gzip or zstd, or an OCI image layout)
//! are kept once, as a canonical tar (entries sorted by path, with their modes and owners
//! and a fixed time), so the same tree imported from any of these gets the same digest.
//! Customizers and instance layers read it in place through its index (`tree.rs`); no
//! unpacked copy is kept. Disk masters (raw and qcow2) and ISO masters (bootable ISO 9660,
//! booted as a CD) are checked and kept as they are, read-only: a disk's instances refer to
//! it as the backing file of their overlays, an ISO's boot it read-only; neither changes it.

pub mod archive;
pub mod disk;
pub mod layer;
pub mod materialize;
pub mod oci;
pub mod seed;
pub mod tree;

use crate::{Report, Step};
use archive::Compression;
use mint_model::records::Image;
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// What an imported source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// A directory holding a root filesystem.
    Directory,
    /// A tar archive, plain or compressed.
    Tar(Compression),
    /// An OCI image layout directory.
    OciLayout,
    /// A qcow2 disk image.
    Qcow2,
    /// A raw disk image.
    Raw,
    /// A bootable ISO 9660 image (a hybrid one too, though it also carries an MBR).
    Iso,
}

impl SourceFormat {
    /// The name the API and errors use.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceFormat::Directory => "dir",
            SourceFormat::Tar(Compression::None) => "tar",
            SourceFormat::Tar(Compression::Gzip) => "tar+gzip",
            SourceFormat::Tar(Compression::Zstd) => "tar+zstd",
            SourceFormat::OciLayout => "oci",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Raw => "raw",
            SourceFormat::Iso => "iso",
        }
    }

    /// Parses a `--format` value.
    pub fn parse(s: &str) -> Result<SourceFormat, String> {
        Ok(match s {
            "dir" => SourceFormat::Directory,
            "tar" => SourceFormat::Tar(Compression::None),
            "tar+gzip" | "tgz" => SourceFormat::Tar(Compression::Gzip),
            "tar+zstd" => SourceFormat::Tar(Compression::Zstd),
            "oci" => SourceFormat::OciLayout,
            "qcow2" => SourceFormat::Qcow2,
            "raw" => SourceFormat::Raw,
            "iso" => SourceFormat::Iso,
            other => {
                return Err(format!(
                    "field `format`: `{other}` is not one of dir, tar, tar+gzip, tar+zstd, oci, qcow2, raw, iso"
                ));
            }
        })
    }

    /// The format a file's name claims, if its extension says one.
    fn claimed_by_name(path: &Path) -> Option<SourceFormat> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let ends = |suffixes: &[&str]| suffixes.iter().any(|s| name.ends_with(s));
        Some(if ends(&[".tar.gz", ".tgz"]) {
            SourceFormat::Tar(Compression::Gzip)
        } else if ends(&[".tar.zst", ".tar.zstd"]) {
            SourceFormat::Tar(Compression::Zstd)
        } else if ends(&[".tar"]) {
            SourceFormat::Tar(Compression::None)
        } else if ends(&[".qcow2"]) {
            SourceFormat::Qcow2
        } else if ends(&[".raw"]) {
            SourceFormat::Raw
        } else if ends(&[".iso"]) {
            SourceFormat::Iso
        } else {
            return None;
        })
    }
}

/// What `source` is, from its contents; a file that is no format mint reads is refused.
pub fn detect(source: &Path) -> Result<SourceFormat, ImageError> {
    let meta =
        std::fs::metadata(source).map_err(io(format!("cannot read {}", source.display())))?;
    if meta.is_dir() {
        return Ok(if oci::is_layout(source) {
            SourceFormat::OciLayout
        } else {
            SourceFormat::Directory
        });
    }
    let mut head = vec![0u8; 4096];
    let mut f =
        std::fs::File::open(source).map_err(io(format!("cannot open {}", source.display())))?;
    let mut n = 0;
    while n < head.len() {
        match f
            .read(&mut head[n..])
            .map_err(io(format!("cannot read {}", source.display())))?
        {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        SourceFormat::Tar(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        SourceFormat::Tar(Compression::Zstd)
    } else if disk::is_qcow2(&head) {
        SourceFormat::Qcow2
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        SourceFormat::Tar(Compression::None)
    } else if disk::is_iso9660(&mut f).map_err(io(format!("cannot read {}", source.display())))? {
        // Before the raw check: a hybrid ISO has an MBR too, and is booted as a CD.
        SourceFormat::Iso
    } else if disk::is_raw_disk(&head, meta.len()) {
        SourceFormat::Raw
    } else {
        return Err(ImageError::Invalid(format!(
            "{} is not a format mint imports: a directory, an OCI layout, a tar archive (plain, gzip or zstd), a qcow2 image, a raw disk with a partition table, or a bootable ISO 9660 image",
            source.display()
        )));
    })
}

/// Where images live: tree masters as `<dir>/<hex>.tar`, disk masters as
/// `<dir>/<hex>.qcow2` or `<dir>/<hex>.raw`, ISO masters as `<dir>/<hex>.iso`, per-instance
/// parts under `<dir>/blobs/`.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// An image store rooted at `dir`, created if needed.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        std::fs::create_dir_all(dir).map_err(io(format!(
            "cannot create image directory {}",
            dir.display()
        )))?;
        Ok(ImageStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The canonical tar of a tree image.
    pub fn tar(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}.tar", digest.trim_start_matches("sha256:")))
    }

    /// The stored file of a disk image (`format` is `qcow2` or `raw`).
    pub fn disk(&self, digest: &str, format: &str) -> PathBuf {
        self.dir
            .join(format!("{}.{format}", digest.trim_start_matches("sha256:")))
    }

    /// The directory holding every stored image and blob.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// Stores `bytes` as a content-addressed blob (sparsely) and returns its digest. Storing
    /// the same bytes again is free. Call [`ImageStore::sync`] before acknowledging
    /// anything that refers to it.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, ImageError> {
        use sha2::Digest;
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        let path = self.blobs().join(&hex);
        if !path.exists() {
            std::fs::create_dir_all(self.blobs())
                .map_err(io("cannot create the blob directory"))?;
            let tmp = self.blobs().join(format!(".{hex}.{}", std::process::id()));
            seed::write_sparse(&tmp, bytes, false)?;
            std::fs::rename(&tmp, &path).map_err(io("cannot store a blob"))?;
        }
        Ok(format!("sha256:{hex}"))
    }

    /// Moves a file whose digest is known into the blob store; the same bytes stored
    /// already make this free.
    pub fn adopt_blob(&self, file: &Path, digest: &str) -> Result<String, ImageError> {
        let hex = digest.trim_start_matches("sha256:");
        std::fs::create_dir_all(self.blobs()).map_err(io("cannot create the blob directory"))?;
        let path = self.blobs().join(hex);
        if path.exists() {
            let _ = std::fs::remove_file(file);
        } else {
            std::fs::File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot sync a blob"))?;
            std::fs::rename(file, &path).map_err(io("cannot store a blob"))?;
        }
        Ok(digest.to_string())
    }

    /// Where the stored bytes of `digest` are: a blob, a disk master or overlay, or a tree
    /// master's canonical tar.
    pub fn locate(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        [
            self.blobs().join(hex),
            self.dir.join(format!("{hex}.qcow2")),
            self.dir.join(format!("{hex}.raw")),
            self.dir.join(format!("{hex}.iso")),
            self.dir.join(format!("{hex}.tar")),
        ]
        .into_iter()
        .find(|p| p.is_file())
    }

    /// Checks that the stored bytes of `digest` still hash to it. `Ok(false)` when nothing
    /// is stored under it.
    pub fn verify(&self, digest: &str) -> Result<bool, ImageError> {
        use sha2::Digest;
        let Some(path) = self.locate(digest) else {
            return Ok(false);
        };
        let mut f =
            std::fs::File::open(&path).map_err(io(format!("cannot open {}", path.display())))?;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut f, &mut h).map_err(io(format!("cannot read {}", path.display())))?;
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != digest {
            return Err(ImageError::Invalid(format!(
                "{} hashes to {got}, not {digest}",
                path.display()
            )));
        }
        Ok(true)
    }

    /// Moves the stored file of `digest` aside to `<dir>/quarantine/`, so it is never
    /// served again; returns where it went.
    pub fn quarantine(&self, digest: &str) -> Result<Option<PathBuf>, ImageError> {
        let Some(path) = self.locate(digest) else {
            return Ok(None);
        };
        let q = self.dir.join("quarantine");
        std::fs::create_dir_all(&q).map_err(io("cannot create the quarantine directory"))?;
        let to = q.join(path.file_name().unwrap_or_default());
        std::fs::rename(&path, &to).map_err(io(format!("cannot move {} aside", path.display())))?;
        Ok(Some(to))
    }

    /// The digests of everything stored: masters, overlays and blobs.
    pub fn stored(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in [self.dir.clone(), self.blobs()] {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.split('.').next().unwrap_or_default();
                if stem.len() == 64
                    && stem.bytes().all(|b| b.is_ascii_hexdigit())
                    && e.path().is_file()
                {
                    out.push(format!("sha256:{stem}"));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The empty qcow2 overlay backed by disk master `image`, stored beside it (so its
    /// relative backing-file name resolves) under its own digest; the same every time.
    pub fn disk_overlay(&self, image: &Image) -> Result<String, ImageError> {
        use sha2::Digest;
        let backing = format!(
            "{}.{}",
            image.digest.trim_start_matches("sha256:"),
            image.format
        );
        let tmp = self
            .dir
            .join(format!(".overlay-{}-{}.qcow2", std::process::id(), backing));
        disk::write_overlay(&tmp, &backing, &image.format, image.virtual_size)?;
        let mut hash = sha2::Sha256::new();
        std::io::copy(
            &mut std::fs::File::open(&tmp).map_err(io("cannot read the overlay"))?,
            &mut hash,
        )
        .map_err(io("cannot read the overlay"))?;
        let hex = hex::encode(hash.finalize());
        std::fs::rename(&tmp, self.dir.join(format!("{hex}.qcow2")))
            .map_err(io("cannot store the overlay"))?;
        Ok(format!("sha256:{hex}"))
    }

    /// Makes every blob written so far durable: one `syncfs` for the file system that
    /// holds them, rather than one `fsync` per blob of a tier of thousands.
    pub fn sync(&self) -> Result<(), ImageError> {
        use std::os::fd::AsRawFd;
        let d = std::fs::File::open(&self.dir).map_err(io("cannot open the image directory"))?;
        // SAFETY: `syncfs` reads only the descriptor, which `d` keeps open for the call.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(ImageError::Io {
                what: "cannot sync the image store".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Imports a master. Its format is read from its contents; `claimed` (or, failing
    /// that, the file's extension) must agree with what the contents are. Progress goes to
    /// `report`: `reading` or `flattening` the source, `hashing`, or `copying`
    /// a disk.
    pub fn import(
        &self,
        source: &Path,
        name: Option<&str>,
        claimed: Option<SourceFormat>,
        report: Report<'_>,
    ) -> Result<Image, ImageError> {
        let found = detect(source)?;
        if let Some(claim) = claimed.or_else(|| SourceFormat::claimed_by_name(source)) {
            let same = claim == found
                || (claim == SourceFormat::Directory && found == SourceFormat::OciLayout);
            if !same {
                return Err(ImageError::Invalid(format!(
                    "{} claims to be {} but is {}; fix the name or --format",
                    source.display(),
                    claim.as_str(),
                    found.as_str()
                )));
            }
        }
        let found = if claimed == Some(SourceFormat::Directory) {
            SourceFormat::Directory
        } else {
            found
        };
        let name = name.map(str::to_string).unwrap_or_else(|| {
            source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        });
        let staging = tempdir_in(&self.dir)?;
        let tree = match found {
            SourceFormat::Qcow2 | SourceFormat::Raw | SourceFormat::Iso => {
                return self.import_disk(source, name, found, &staging, report);
            }
            SourceFormat::Directory => source.to_path_buf(),
            SourceFormat::Tar(compression) => {
                report(Step {
                    phase: "reading",
                    done: 0,
                    total: 0,
                });
                let plain = if compression == Compression::None {
                    source.to_path_buf()
                } else {
                    let p = staging.0.join("source.tar");
                    archive::decompress(source, compression, &p)?;
                    p
                };
                archive::unpack_checked(&plain, &staging.0.join("tree"))?;
                staging.0.join("tree")
            }
            SourceFormat::OciLayout => {
                report(Step {
                    phase: "flattening",
                    done: 0,
                    total: 0,
                });
                oci::flatten(source, &staging.0.join("tree"), &staging.0)?;
                staging.0.join("tree")
            }
        };
        let tar_tmp = staging.0.join("image.tar");
        let (digest, size, entries) = archive::write_canonical(&tree, &tar_tmp, report)?;
        let hex = digest.trim_start_matches("sha256:").to_string();
        let final_tar = self.dir.join(format!("{hex}.tar"));
        if !final_tar.exists() {
            std::fs::File::open(&tar_tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("cannot sync the image"))?;
            std::fs::rename(&tar_tmp, &final_tar).map_err(io("cannot store the image"))?;
        }
        Ok(Image {
            digest,
            name,
            format: "tree".into(),
            size,
            entries,
            source: found.as_str().into(),
            virtual_size: 0,
        })
    }

    /// Checks a disk master, copies it in while hashing it, and keeps it read-only.
    fn import_disk(
        &self,
        source: &Path,
        name: String,
        format: SourceFormat,
        staging: &TempDir,
        report: Report<'_>,
    ) -> Result<Image, ImageError> {
        let virtual_size = match format {
            SourceFormat::Qcow2 => disk::check_qcow2(source)?.virtual_size,
            SourceFormat::Iso => disk::check_iso(source)?,
            _ => std::fs::metadata(source).map_err(io("cannot stat"))?.len(),
        };
        let total = std::fs::metadata(source).map_err(io("cannot stat"))?.len();
        let tmp = staging.0.join("disk");
        let mut from =
            std::fs::File::open(source).map_err(io(format!("cannot open {}", source.display())))?;
        let mut to = archive::HashingWriter::new(
            std::fs::File::create(&tmp).map_err(io("cannot write a staging file"))?,
        );
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = from
                .read(&mut buf)
                .map_err(io(format!("cannot read {}", source.display())))?;
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut to, &buf[..n])
                .map_err(io("cannot write a staging file"))?;
            done += n as u64;
            report(Step {
                phase: "copying",
                done,
                total,
            });
        }
        let (digest, size) = to.finish();
        let kind = format.as_str();
        let stored = self.disk(&digest, kind);
        if !stored.exists() {
            let mut perms = std::fs::metadata(&tmp)
                .map_err(io("cannot stat"))?
                .permissions();
            perms.set_readonly(true);
            std::fs::set_permissions(&tmp, perms)
                .map_err(io("cannot make the master read-only"))?;
            std::fs::rename(&tmp, &stored).map_err(io("cannot store the image"))?;
        }
        Ok(Image {
            digest,
            name,
            format: kind.into(),
            size,
            entries: 0,
            source: kind.into(),
            virtual_size,
        })
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
