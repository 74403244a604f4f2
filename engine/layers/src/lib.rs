//! Tree layers as mint writes and reads them: a plain tar whose removals are OCI whiteouts
//! (`.wh.NAME` removes `NAME` from the layers below, `.wh..wh..opq` hides everything a
//! directory held below), unpacked safely on the engine (imports) and on nodes (the
//! agent's cache and instance roots).
//!
//! Unpacking refuses any entry that leaves its root (an absolute path, `..`, a hard link
//! to outside the archive, or a path through a symlink), creates device nodes and FIFOs as
//! what they are where the process may (and reports each one it may not create), keeps
//! owners when it runs as root, and sets directory modes last so a read-only directory in
//! a layer does not stop its own children from being written.

pub mod share;

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The prefix of a whiteout entry's name.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of an opaque-directory marker.
pub const OPAQUE: &str = ".wh..wh..opq";

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer is malformed or tries to leave its root; the message names the entry.
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

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LayerError {
    let what = what.into();
    move |source| LayerError::Io { what, source }
}

/// What whiteout entries do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whiteouts {
    /// They are the plain files they look like (a tar that is not a layer).
    Keep,
    /// They act on what the directory holds already: the named path is removed, an
    /// opaque directory is emptied. For a root assembled from a lower layer's files.
    Apply,
    /// They become overlayfs whiteouts (a 0/0 character device; the
    /// `trusted.overlay.opaque` attribute), for an overlay's upper directory.
    Overlay,
}

/// What an unpack did.
#[derive(Debug, Default, Clone)]
pub struct Unpacked {
    /// Entries read.
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Special files that could not be created here, one line each.
    pub warnings: Vec<String>,
}

/// Whether this process may set owners and create device nodes.
pub(crate) fn privileged() -> bool {
    // SAFETY: geteuid reads the process's credentials and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a path from an archive stays inside its root: relative, without `..`.
pub fn check_path(path: &Path) -> Result<(), LayerError> {
    if path.components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::RootDir | Component::Prefix(_)
        )
    }) {
        return Err(LayerError::Invalid(format!(
            "entry `{}` is absolute or climbs out with `..`; refusing the archive",
            path.display()
        )));
    }
    Ok(())
}

/// Whether a link entry stays inside the root. A symlink's target is read from the link's
/// directory; an absolute symlink target is fine (it is resolved inside the image when the
/// image is used); a hard link's target must be a relative path in the archive.
pub fn check_link<R: Read>(entry: &tar::Entry<'_, R>, path: &Path) -> Result<(), LayerError> {
    let Ok(Some(target)) = entry.link_name() else {
        return Ok(());
    };
    let kind = entry.header().entry_type();
    let base = if kind.is_hard_link() {
        Path::new("")
    } else {
        path.parent().unwrap_or(Path::new(""))
    };
    if kind.is_hard_link() && target.is_absolute() {
        return Err(LayerError::Invalid(format!(
            "hard link `{}` has an absolute target",
            path.display()
        )));
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
            return Err(LayerError::Invalid(format!(
                "link `{}` -> `{}` escapes the root; refusing the archive",
                path.display(),
                target.display()
            )));
        }
    }
    Ok(())
}

/// The host directory for archive directory `rel` under `root`, created if missing. A
/// symlink on the way is refused: layers name real paths, and following one could lead a
/// write outside the root.
pub fn real_dir(root: &Path, rel: &Path) -> Result<PathBuf, LayerError> {
    let mut here = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(part) = c else { continue };
        here.push(part);
        match here.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(LayerError::Invalid(format!(
                    "entry under `{}` goes through a symlink; refusing it",
                    rel.display()
                )));
            }
            Ok(_) => {
                // A file where the layer wants a directory: the layer replaces it.
                std::fs::remove_file(&here)
                    .map_err(io(format!("cannot replace {}", here.display())))?;
                std::fs::create_dir(&here)
                    .map_err(io(format!("cannot create {}", here.display())))?;
            }
            Err(_) => std::fs::create_dir(&here)
                .map_err(io(format!("cannot create {}", here.display())))?,
        }
    }
    Ok(here)
}

/// Removes whatever `p` is (a directory with everything under it), if anything.
pub fn remove_any(p: &Path) -> Result<(), LayerError> {
    match p.symlink_metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => {
            make_writable(p);
            std::fs::remove_dir_all(p).map_err(io(format!("cannot remove {}", p.display())))
        }
        Ok(_) => std::fs::remove_file(p).map_err(io(format!("cannot remove {}", p.display()))),
    }
}

/// Gives the owner write access to every directory under `p`, so an unprivileged process
/// can remove a tree that holds read-only directories.
fn make_writable(p: &Path) {
    if privileged() {
        return;
    }
    if let Ok(m) = p.symlink_metadata()
        && m.is_dir()
    {
        let _ = std::fs::set_permissions(
            p,
            std::fs::Permissions::from_mode(m.permissions().mode() | 0o700),
        );
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

pub(crate) fn cstring(p: &Path) -> Result<CString, LayerError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| LayerError::Invalid(format!("path {} holds a NUL byte", p.display())))
}

/// The kind of a special file, for messages.
fn special_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Block => "block device",
        tar::EntryType::Char => "character device",
        _ => "FIFO",
    }
}

/// Creates the device node or FIFO an entry (at `rel` in its archive) describes at `at`.
/// Where the process may not create it, nothing is made and the warning is returned.
pub fn make_special<R: Read>(
    entry: &tar::Entry<'_, R>,
    rel: &Path,
    at: &Path,
) -> Result<Option<String>, LayerError> {
    let h = entry.header();
    let kind = h.entry_type();
    let mode = h.mode().map_err(|e| {
        LayerError::Invalid(format!("entry `{}` has a bad mode: {e}", rel.display()))
    })? & 0o7777;
    let (major, minor) = (
        h.device_major().ok().flatten().unwrap_or(0),
        h.device_minor().ok().flatten().unwrap_or(0),
    );
    let t = match kind {
        tar::EntryType::Block => libc::S_IFBLK,
        tar::EntryType::Char => libc::S_IFCHR,
        _ => libc::S_IFIFO,
    };
    remove_any(at)?;
    let c = cstring(at)?;
    // SAFETY: `c` is a NUL-terminated path that lives for the call.
    if unsafe { libc::mknod(c.as_ptr(), t | mode, libc::makedev(major, minor)) } != 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
            return Ok(Some(format!(
                "skipped {} `/{}` ({major}:{minor}): {e}",
                special_name(kind),
                rel.display()
            )));
        }
        return Err(LayerError::Io {
            what: format!("cannot create {} {}", special_name(kind), at.display()),
            source: e,
        });
    }
    // mknod applies the umask; the entry's mode is what it is.
    let _ = std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode));
    if privileged() {
        let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
        let _ = std::os::unix::fs::lchown(at, Some(uid), Some(gid));
    }
    Ok(None)
}

/// Makes `dir` an overlayfs opaque directory.
fn set_opaque(dir: &Path) -> Result<(), LayerError> {
    let c = cstring(dir)?;
    let (name, value) = (c"trusted.overlay.opaque", b"y");
    // SAFETY: the path and name are NUL-terminated and the value is a live slice of the
    // length given.
    if unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    } != 0
    {
        return Err(LayerError::Io {
            what: format!("cannot mark {} opaque", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Unpacks the tar `reader` into `into`, treating whiteouts as `whiteouts` says.
pub fn unpack<R: Read>(
    reader: R,
    into: &Path,
    whiteouts: Whiteouts,
) -> Result<Unpacked, LayerError> {
    std::fs::create_dir_all(into).map_err(io(format!("cannot create {}", into.display())))?;
    let privileged = privileged();
    let mut a = tar::Archive::new(reader);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(privileged);
    a.set_overwrite(true);
    let mut out = Unpacked::default();
    let mut dirs: Vec<(PathBuf, u32, u64, u64)> = Vec::new();
    let entries = a
        .entries()
        .map_err(|e| LayerError::Invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            LayerError::Invalid(format!("the archive is truncated or not a tar: {e}"))
        })?;
        let rel = entry
            .path()
            .map_err(|e| LayerError::Invalid(format!("an entry has an unreadable path: {e}")))?
            .into_owned();
        check_path(&rel)?;
        check_link(&entry, &rel)?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            continue;
        }
        out.entries += 1;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent = rel.parent().unwrap_or(Path::new(""));
        if whiteouts != Whiteouts::Keep && name.starts_with(WHITEOUT_PREFIX) {
            let dir = real_dir(into, parent)?;
            if name == OPAQUE {
                match whiteouts {
                    Whiteouts::Apply => {
                        for e in std::fs::read_dir(&dir)
                            .map_err(io(format!("cannot list {}", dir.display())))?
                            .flatten()
                        {
                            remove_any(&e.path())?;
                        }
                    }
                    _ => set_opaque(&dir)?,
                }
            } else {
                let target = dir.join(&name[WHITEOUT_PREFIX.len()..]);
                remove_any(&target)?;
                if whiteouts == Whiteouts::Overlay {
                    let c = cstring(&target)?;
                    // SAFETY: `c` is a NUL-terminated path that lives for the call.
                    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) } != 0 {
                        return Err(LayerError::Io {
                            what: format!("cannot write the whiteout {}", target.display()),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
            }
            continue;
        }
        let dir = real_dir(into, parent)?;
        let at = dir.join(&name);
        match kind {
            tar::EntryType::Directory => {
                if at.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                    remove_any(&at)?;
                }
                let at = real_dir(into, &rel)?;
                let h = entry.header();
                dirs.push((
                    at,
                    h.mode().unwrap_or(0o755) & 0o7777,
                    h.uid().unwrap_or(0),
                    h.gid().unwrap_or(0),
                ));
            }
            tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo => {
                if let Some(w) = make_special(&entry, &rel, &at)? {
                    out.warnings.push(w);
                }
            }
            _ => {
                // Never write through what is there: it may be a hard link to a lower
                // layer's file.
                remove_any(&at)?;
                out.bytes += entry.header().size().unwrap_or(0);
                entry.unpack_in(into).map_err(|e| {
                    // tar nests the cause (a read that failed, a full disk) two levels
                    // down: name the innermost one, which is the one to act on.
                    let mut cause = std::error::Error::source(&e);
                    let mut innermost = None;
                    while let Some(c) = cause {
                        innermost = Some(c.to_string());
                        cause = c.source();
                    }
                    LayerError::Invalid(format!(
                        "cannot unpack `{}`: {e} ({})",
                        rel.display(),
                        innermost.unwrap_or_default()
                    ))
                })?;
            }
        }
    }
    // Innermost first, so a read-only parent is made so after its children.
    for (dir, mode, uid, gid) in dirs.iter().rev() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode))
            .map_err(io(format!("cannot set the mode of {}", dir.display())))?;
        if privileged {
            let _ = std::os::unix::fs::lchown(dir, Some(*uid as u32), Some(*gid as u32));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mint-layers-{name}-{}", std::process::id()));
        let _ = remove_any(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Directory);
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    fn special(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: tar::EntryType,
        major: u32,
        minor: u32,
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_mode(0o660);
        h.set_entry_type(kind);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        b.append_data(&mut h, path, &[][..]).unwrap();
    }

    #[test]
    fn whiteouts_apply_to_a_lower_tree_and_never_write_through_links() {
        let d = scratch("apply");
        let lower = d.join("lower");
        std::fs::create_dir_all(lower.join("etc/old")).unwrap();
        std::fs::write(lower.join("etc/hostname"), "master\n").unwrap();
        std::fs::write(lower.join("etc/gone"), "x").unwrap();
        std::fs::write(lower.join("etc/old/a"), "a").unwrap();
        let root = d.join("root");
        std::fs::create_dir_all(root.join("etc/old")).unwrap();
        for f in ["etc/hostname", "etc/gone", "etc/old/a"] {
            std::fs::hard_link(lower.join(f), root.join(f)).unwrap();
        }
        let mut b = tar::Builder::new(Vec::new());
        dir(&mut b, "etc", 0o755);
        file(&mut b, "etc/.wh.gone", b"");
        dir(&mut b, "etc/old", 0o750);
        file(&mut b, "etc/old/.wh..wh..opq", b"");
        file(&mut b, "etc/old/b", b"b");
        file(&mut b, "etc/hostname", b"web-01\n");
        let layer = b.into_inner().unwrap();
        let u = unpack(&layer[..], &root, Whiteouts::Apply).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "web-01\n"
        );
        assert_eq!(
            std::fs::read_to_string(lower.join("etc/hostname")).unwrap(),
            "master\n",
            "the lower file is untouched"
        );
        assert!(!root.join("etc/gone").exists() && lower.join("etc/gone").exists());
        assert!(
            !root.join("etc/old/a").exists() && root.join("etc/old/b").exists(),
            "the opaque directory hides the lower entries"
        );
        assert_eq!(
            std::fs::metadata(root.join("etc/old"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o750
        );
        assert_eq!(u.entries, 6);
        let _ = remove_any(&d);
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts_in_an_upper_directory() {
        if !privileged() {
            return; // overlayfs whiteouts are device nodes: only root makes them.
        }
        let d = scratch("overlay");
        let mut b = tar::Builder::new(Vec::new());
        dir(&mut b, "etc", 0o755);
        file(&mut b, "etc/.wh.gone", b"");
        file(&mut b, "etc/.wh..wh..opq", b"");
        let layer = b.into_inner().unwrap();
        unpack(&layer[..], &d, Whiteouts::Overlay).unwrap();
        let m = std::fs::symlink_metadata(d.join("etc/gone")).unwrap();
        assert!(m.file_type().is_char_device());
        let _ = remove_any(&d);
    }

    #[test]
    fn special_files_stay_what_they_are() {
        let d = scratch("special");
        let mut b = tar::Builder::new(Vec::new());
        dir(&mut b, "dev", 0o755);
        special(&mut b, "dev/sda", tar::EntryType::Block, 8, 0);
        special(&mut b, "dev/null", tar::EntryType::Char, 1, 3);
        special(&mut b, "run/fifo", tar::EntryType::Fifo, 0, 0);
        let layer = b.into_inner().unwrap();
        let u = unpack(&layer[..], &d, Whiteouts::Keep).unwrap();
        let t = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap().file_type();
        assert!(t("run/fifo").is_fifo(), "a FIFO is made by anyone");
        if privileged() {
            use std::os::unix::fs::MetadataExt;
            assert!(t("dev/sda").is_block_device() && t("dev/null").is_char_device());
            assert_eq!(
                std::fs::symlink_metadata(d.join("dev/sda")).unwrap().rdev(),
                libc::makedev(8, 0)
            );
            assert!(u.warnings.is_empty(), "{:?}", u.warnings);
        } else {
            assert_eq!(u.warnings.len(), 2, "{:?}", u.warnings);
            assert!(
                u.warnings[0].contains("block device `/dev/sda` (8:0)"),
                "{:?}",
                u.warnings
            );
        }
        let _ = remove_any(&d);
    }

    #[test]
    fn entries_that_leave_the_root_are_refused() {
        let d = scratch("escape");
        std::fs::create_dir_all(d.join("root")).unwrap();
        std::os::unix::fs::symlink("/tmp", d.join("root/link")).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        let mut raw = tar::Builder::new(Vec::new());
        raw.append_data(&mut h, "link/evil", &b"x"[..]).unwrap();
        let e = unpack(
            &raw.into_inner().unwrap()[..],
            &d.join("root"),
            Whiteouts::Apply,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("goes through a symlink"), "{e}");
        let _ = remove_any(&d);
    }
}
