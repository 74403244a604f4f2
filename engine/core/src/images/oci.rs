//! OCI image layouts (what podman, buildah and skopeo write): the index, the manifest for
//! this machine's platform, and its layers flattened into one root filesystem, honouring
//! whiteouts. Every blob is checked against its descriptor's digest and size first.

use super::archive::{self, Compression};
use super::{ImageError, io};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Whether `dir` is an OCI image layout (it has an `oci-layout` file).
pub fn is_layout(dir: &Path) -> bool {
    dir.join("oci-layout").is_file()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Clone)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Descriptor>,
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

fn bad(layout: &Path, message: String) -> ImageError {
    ImageError::Invalid(format!("OCI layout {}: {message}", layout.display()))
}

/// The machine's architecture as OCI spells it.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Reads a blob after checking it exists and matches its descriptor's size and digest.
fn blob(layout: &Path, d: &Descriptor) -> Result<PathBuf, ImageError> {
    let Some(hex) = d
        .digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Err(bad(
            layout,
            format!("descriptor digest `{}` is not a sha256 digest", d.digest),
        ));
    };
    let path = layout.join("blobs/sha256").join(hex);
    let mut file = std::fs::File::open(&path).map_err(|_| {
        bad(
            layout,
            format!("blob {} is missing (blobs/sha256/{hex})", d.digest),
        )
    })?;
    let mut hash = Sha256::new();
    let n = std::io::copy(&mut file, &mut hash)
        .map_err(io(format!("cannot read {}", path.display())))?;
    if n != d.size {
        return Err(bad(
            layout,
            format!(
                "blob {} has {n} bytes, but its descriptor says {}",
                d.digest, d.size
            ),
        ));
    }
    let got = hex::encode(hash.finalize());
    if got != hex {
        return Err(bad(
            layout,
            format!(
                "blob {} has the wrong digest (its bytes hash to sha256:{got})",
                d.digest
            ),
        ));
    }
    Ok(path)
}

fn json<T: serde::de::DeserializeOwned>(
    layout: &Path,
    path: &Path,
    what: &str,
) -> Result<T, ImageError> {
    let bytes = std::fs::read(path).map_err(|_| bad(layout, format!("cannot read {what}")))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(layout, format!("{what} does not parse: {e}")))
}

/// Picks the manifest for this machine from an index, following nested indexes.
fn pick(layout: &Path, manifests: &[Descriptor], depth: u32) -> Result<Descriptor, ImageError> {
    let arch = oci_arch();
    let chosen = match manifests {
        [] => return Err(bad(layout, "the index lists no manifest".into())),
        [only] => only.clone(),
        many => many
            .iter()
            .find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
            .cloned()
            .ok_or_else(|| {
                bad(
                    layout,
                    format!("none of its {} manifests is for linux/{arch}", many.len()),
                )
            })?,
    };
    if INDEX_TYPES.contains(&chosen.media_type.as_str()) {
        if depth > 4 {
            return Err(bad(layout, "indexes nest more than 4 deep".into()));
        }
        let nested: Index = json(
            layout,
            &blob(layout, &chosen)?,
            &format!("index {}", chosen.digest),
        )?;
        return pick(layout, &nested.manifests, depth + 1);
    }
    Ok(chosen)
}

fn layer_compression(layout: &Path, media_type: &str) -> Result<Compression, ImageError> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Compression::Zstd),
        other => Err(bad(
            layout,
            format!("layer media type `{other}` is not a tar, tar+gzip or tar+zstd layer"),
        )),
    }
}

/// Flattens the layout's image for this machine into `root` (created), in layer order.
/// Returns the number of layers applied.
pub fn flatten(layout: &Path, root: &Path, staging: &Path) -> Result<usize, ImageError> {
    let version: LayoutFile = json(layout, &layout.join("oci-layout"), "oci-layout")?;
    if !version.image_layout_version.starts_with("1.") {
        return Err(bad(
            layout,
            format!(
                "imageLayoutVersion {} is not 1.x",
                version.image_layout_version
            ),
        ));
    }
    let index: Index = json(layout, &layout.join("index.json"), "index.json")?;
    let manifest_desc = pick(layout, &index.manifests, 0)?;
    let manifest: Manifest = json(
        layout,
        &blob(layout, &manifest_desc)?,
        &format!("manifest {}", manifest_desc.digest),
    )?;
    // Every blob is checked before any layer is applied: a missing or altered layer
    // refuses the whole image.
    let layers = manifest
        .layers
        .iter()
        .map(|d| {
            Ok((
                blob(layout, d)?,
                layer_compression(layout, &d.media_type)?,
                d.digest.clone(),
            ))
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    std::fs::create_dir_all(root).map_err(io("cannot create the flattening directory"))?;
    for (i, (path, compression, digest)) in layers.iter().enumerate() {
        let plain = staging.join(format!("layer-{i}.tar"));
        archive::decompress(path, *compression, &plain)?;
        apply_layer(&plain, root).map_err(|e| match e {
            ImageError::Invalid(m) => bad(layout, format!("layer {digest}: {m}")),
            other => other,
        })?;
        let _ = std::fs::remove_file(&plain);
    }
    Ok(layers.len())
}

/// Applies one layer: first its whiteouts remove what lower layers put there (`.wh.NAME`
/// removes NAME, `.wh..wh..opq` empties its directory), then its other entries are written.
fn apply_layer(tar_path: &Path, root: &Path) -> Result<(), ImageError> {
    archive::check_all(tar_path)?;
    let mut a = tar::Archive::new(archive::open(tar_path, Compression::None)?);
    for entry in a
        .entries()
        .map_err(|e| ImageError::Invalid(format!("not a tar: {e}")))?
    {
        let entry = entry.map_err(|e| ImageError::Invalid(format!("truncated: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| ImageError::Invalid(format!("unreadable path: {e}")))?
            .into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(".wh.") {
            continue;
        }
        let parent = real_dir(root, path.parent().unwrap_or(Path::new("")))?;
        if name == ".wh..wh..opq" {
            if let Ok(children) = std::fs::read_dir(&parent) {
                for c in children.flatten() {
                    remove_any(&c.path())?;
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            remove_any(&parent.join(hidden))?;
        }
    }
    let mut a = tar::Archive::new(archive::open(tar_path, Compression::None)?);
    a.set_preserve_permissions(true);
    a.set_overwrite(true);
    for entry in a
        .entries()
        .map_err(|e| ImageError::Invalid(format!("not a tar: {e}")))?
    {
        let mut entry = entry.map_err(|e| ImageError::Invalid(format!("truncated: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| ImageError::Invalid(format!("unreadable path: {e}")))?
            .into_owned();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".wh."))
        {
            continue;
        }
        // A file replacing a directory (or the reverse) from a lower layer. Under a
        // symlinked directory nothing is removed; `unpack_in` itself refuses to write
        // outside the root.
        if let Ok(parent) = real_dir(root, path.parent().unwrap_or(Path::new(""))) {
            let target = parent.join(path.file_name().unwrap_or_default());
            if let Ok(m) = target.symlink_metadata()
                && (m.is_dir() != entry.header().entry_type().is_dir())
            {
                remove_any(&target)?;
            }
        }
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo
        ) {
            // tar would make a device node an empty regular file; it stays what it is.
            let at = real_dir(root, &path)?;
            if let Some(parent) = at.parent() {
                std::fs::create_dir_all(parent).map_err(io("cannot create a directory"))?;
            }
            if let Some(w) =
                mint_layers::make_special(&entry, &path, &at).map_err(archive::layer_error)?
            {
                return Err(ImageError::Invalid(format!(
                    "{w}; import masters with device nodes as root"
                )));
            }
            continue;
        }
        entry
            .unpack_in(root)
            .map_err(|e| ImageError::Invalid(format!("cannot unpack `{}`: {e}", path.display())))?;
    }
    Ok(())
}

/// `root/rel` where every component of `rel` is a real directory, not a symlink, so that
/// removing something under it can never reach outside the root (a lower layer may have
/// made `etc` a link to the host's `/etc`). A path that does not exist yet is fine: there
/// is nothing under it to remove.
fn real_dir(root: &Path, rel: &Path) -> Result<PathBuf, ImageError> {
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        if at
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            return Err(ImageError::Invalid(format!(
                "`{}` is a symlink in a lower layer; a layer may not change what is under it",
                rel.display()
            )));
        }
    }
    Ok(at)
}

fn remove_any(p: &Path) -> Result<(), ImageError> {
    match p.symlink_metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(p).map_err(io(format!("cannot remove {}", p.display())))
        }
        Ok(_) => std::fs::remove_file(p).map_err(io(format!("cannot remove {}", p.display()))),
    }
}
