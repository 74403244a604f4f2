//! Deleting masters and collecting garbage: masters no tier uses, per-instance blobs (seeds,
//! root filesystem tars), disk overlays and customization overlays no instance refers to,
//! and staging left by an interrupted import.
//!
//! Architecture invariant: garbage is computed from the store's records, never from file
//! ages, and collection must not run while a tier is being created or an image imported
//! (the daemon holds its operation lock for both), so a blob written for a tier that has
//! not committed yet is never taken for garbage.

use crate::{Engine, EngineError, Result};
use mint_model::records::Image;
use std::collections::HashSet;
use std::path::Path;

/// What a collection removed.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct GcReport {
    /// Masters removed (records and files).
    pub masters: Vec<String>,
    /// Blobs and disk overlays removed.
    pub blobs: u64,
    /// Customization overlays removed from the store.
    pub overlays: u64,
    /// Staging directories of interrupted operations removed.
    pub staging: u64,
    /// Bytes freed on disk.
    pub bytes_freed: u64,
}

/// Bytes a path takes on disk (blocks, so sparse files count what they use).
fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = p.symlink_metadata() else {
        return 0;
    };
    let own = m.blocks() * 512;
    if m.is_dir() {
        own + std::fs::read_dir(p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| disk_usage(&e.path()))
            .sum::<u64>()
    } else {
        own
    }
}

fn remove(p: &Path) -> u64 {
    let freed = disk_usage(p);
    let gone = match p.symlink_metadata() {
        Ok(m) if m.is_dir() => {
            // Stored trees may hold read-only directories (from the master's own modes).
            make_writable(p);
            std::fs::remove_dir_all(p).is_ok()
        }
        Ok(_) => std::fs::remove_file(p).is_ok(),
        Err(_) => false,
    };
    if gone { freed } else { 0 }
}

fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = p.symlink_metadata()
        && m.is_dir()
    {
        let _ = std::fs::set_permissions(
            p,
            std::fs::Permissions::from_mode(m.permissions().mode() | 0o700),
        );
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            make_writable(&e.path());
        }
    }
}

impl Engine {
    /// The files of a master in the image store.
    fn master_files(&self, image: &Image) -> Vec<std::path::PathBuf> {
        let hex = image.digest.trim_start_matches("sha256:");
        if !image.is_tree() {
            vec![self.images.disk(&image.digest, &image.format)]
        } else {
            // The unpacked tree older versions kept beside the tar goes too.
            vec![self.images.tar(&image.digest), self.images.dir().join(hex)]
        }
    }

    /// Deletes a master (by digest or name): refused while a tier uses it. Its files go
    /// now; blobs derived from it go at the next [`Engine::gc`].
    pub fn delete_image(&self, id: &str, by: &str) -> Result<Image> {
        let image = self.find_image(id)?;
        self.store.delete_image(&image.digest, by)?;
        for f in self.master_files(&image) {
            remove(&f);
        }
        Ok(image)
    }

    /// The image with digest or name `id`; a name several images carry is refused.
    pub fn find_image(&self, id: &str) -> Result<Image> {
        let images = self.store.images()?;
        let named: Vec<&Image> = images
            .iter()
            .filter(|i| i.digest == id || i.name == id)
            .collect();
        let image = match named.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(EngineError::Invalid(format!(
                    "no image with digest or name `{id}`; `mint image list` shows them"
                )));
            }
            many => {
                return Err(EngineError::Invalid(format!(
                    "{} images are named `{id}`; name one by digest ({})",
                    many.len(),
                    many.iter()
                        .map(|i| i.digest.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        };
        Ok(image)
    }

    /// Removes what nothing refers to: masters no tier uses (unless `keep_masters`),
    /// blobs and disk overlays no instance refers to, overlays of deleted tiers, and
    /// staging left by interrupted operations. Run it with no tier creation or import in
    /// flight (the daemon holds its operation lock).
    pub fn gc(&self, keep_masters: bool, by: &str) -> Result<GcReport> {
        let mut report = GcReport::default();
        let tiers = self.store.tiers()?;
        let used_masters: HashSet<String> = tiers.iter().map(|t| t.image.clone()).collect();
        let mut live_images = Vec::new();
        for image in self.store.images()? {
            if keep_masters || used_masters.contains(&image.digest) {
                live_images.push(image);
            } else {
                let freed: u64 = self
                    .master_files(&image)
                    .iter()
                    .map(|f| disk_usage(f))
                    .sum();
                self.delete_image(&image.digest, by)?;
                report.bytes_freed += freed;
                report.masters.push(image.digest);
            }
        }

        // Everything a live record refers to, by hex digest.
        let mut keep: HashSet<String> = HashSet::new();
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        for i in &live_images {
            keep.insert(hex(&i.digest));
        }
        for d in self
            .kept_blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            keep.insert(hex(d));
        }
        let mut live_overlays: HashSet<String> = HashSet::new();
        let mut live_layer_keys: HashSet<String> = HashSet::new();
        for t in &tiers {
            for inst in self.store.instances(&t.name)? {
                if let Some(d) = &inst.disk {
                    if let Some(o) = &d.overlay {
                        keep.insert(hex(o));
                    }
                    keep.insert(hex(&d.seed));
                }
                if let Some(l) = &inst.layer {
                    keep.insert(hex(l));
                }
                live_layer_keys.insert(format!("layer:{}:{}", t.image, inst.overlay));
                live_overlays.insert(inst.overlay);
            }
        }
        for (key, digest) in self.store.artifacts()? {
            if live_layer_keys.contains(&key) {
                keep.insert(hex(&digest));
            } else {
                self.store.forget_artifact(&key)?;
            }
        }

        let dir = self.images.dir();
        for e in std::fs::read_dir(dir)
            .map_err(|e| EngineError::Invalid(format!("cannot list {}: {e}", dir.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                report.bytes_freed += remove(&e.path());
                report.staging += 1;
                continue;
            }
            if name == "blobs" {
                continue;
            }
            let stem = name.split('.').next().unwrap_or_default();
            // A directory named by a digest is the unpacked copy of a tree master that
            // older versions kept; the master's tar is its one copy now.
            let old_tree = stem.len() == 64 && name.len() == 64 && e.path().is_dir();
            if stem.len() == 64 && (old_tree || !keep.contains(stem)) {
                report.bytes_freed += remove(&e.path());
                report.blobs += 1;
            }
        }
        for e in std::fs::read_dir(dir.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                report.bytes_freed += remove(&e.path());
                report.blobs += 1;
            }
        }
        let unused: Vec<String> = self
            .store
            .overlay_digests()?
            .into_iter()
            .filter(|d| !live_overlays.contains(d))
            .collect();
        report.overlays = unused.len() as u64;
        self.store.remove_overlays(&unused)?;
        Ok(report)
    }
}
