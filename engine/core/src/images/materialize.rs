//! Materializing an instance of a tree master on the engine's host: the master unpacked
//! from its canonical tar, then the instance's layer applied over it (whiteouts remove,
//! files replace), exactly as a node without overlayfs assembles it from its cache.
//! Also the overlay's edits as their canonical JSON spells them, which layers are built from.

use super::{ImageError, io};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How a materialization made the master's files (always copied out of its tar here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Plain copies.
    Copy,
}

/// One edit of an overlay, as the overlay's canonical JSON spells it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum OverlayEdit {
    /// Write a file (contents in base64).
    Write {
        /// Absolute path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
        /// Contents, base64.
        contents: String,
    },
    /// Remove a path and everything under it.
    Remove {
        /// Absolute path in the image.
        path: String,
    },
    /// Make a symlink.
    Symlink {
        /// Absolute path in the image.
        path: String,
        /// Its target, as written.
        target: String,
    },
    /// Make a directory.
    Mkdir {
        /// Absolute path in the image.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

/// What a materialization did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Materialized {
    /// How regular files were made: copied out of the master's tar.
    pub method: Method,
    /// Entries taken from the master.
    pub files: u64,
    /// Bytes of master file data copied.
    pub bytes_copied: u64,
    /// Entries of the instance's layer applied.
    pub edits: u64,
}

/// Builds `dest` (which must not exist) from the master's canonical tar and the
/// instance's layer.
pub fn materialize(
    master_tar: &Path,
    layer: &Path,
    dest: &Path,
) -> Result<Materialized, ImageError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ImageError::Invalid(format!(
            "{} exists; materialize into a new directory",
            dest.display()
        )));
    }
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map(std::io::BufReader::new)
            .map_err(io(format!("cannot open {}", p.display())))
    };
    let unpack =
        |p: &Path, w| mint_layers::unpack(open(p)?, dest, w).map_err(super::archive::layer_error);
    let master = unpack(master_tar, mint_layers::Whiteouts::Keep)?;
    let layer = unpack(layer, mint_layers::Whiteouts::Apply)?;
    for w in master.warnings.iter().chain(&layer.warnings) {
        tracing::warn!("materializing {}: {w}", dest.display());
    }
    Ok(Materialized {
        method: Method::Copy,
        files: master.entries,
        bytes_copied: master.bytes,
        edits: layer.entries,
    })
}
