//! Materializing an instance of a tree master: its root filesystem built from the master
//! and its overlay of edits, sharing the master's file data wherever the file system
//! allows: reflinks (copy-on-write clones) first, hard links where clones are not
//! supported, copies where neither is.
//!
//! Edits never write through a shared file: an edited path is unlinked and created anew.
//! Paths are resolved inside the new root as a chroot would: a symlink in the master
//! (absolute or relative) can never lead an edit outside the root.

use super::{ImageError, io};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

/// How a materialization shared the master's file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Copy-on-write clones (FICLONE): no data copied, each file independent.
    Reflink,
    /// Hard links to the master's files: no data copied; the files are shared with the
    /// master and must only ever be replaced, never written in place.
    Hardlink,
    /// Plain copies.
    Copy,
}

/// What a materialization did.
#[derive(Debug, Clone, Serialize)]
pub struct Materialized {
    /// How regular files were shared.
    pub method: Method,
    /// Regular files taken from the master.
    pub files: u64,
    /// Bytes of master file data copied (0 for reflinks and hard links).
    pub bytes_copied: u64,
    /// Edits applied.
    pub edits: u64,
}

/// Builds `dest` (which must not exist) from the master tree `master` and `edits`.
pub fn materialize(master: &Path, edits: &[OverlayEdit], dest: &Path) -> Result<Materialized, ImageError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ImageError::Invalid(format!("{} exists; materialize into a new directory", dest.display())));
    }
    std::fs::create_dir_all(dest).map_err(io(format!("cannot create {}", dest.display())))?;
    let mut out = Materialized { method: Method::Reflink, files: 0, bytes_copied: 0, edits: 0 };
    let mut method = None;
    copy_tree(master, dest, &mut method, &mut out)?;
    out.method = method.unwrap_or(Method::Reflink);
    for e in edits {
        apply(dest, e)?;
        out.edits += 1;
    }
    Ok(out)
}

fn copy_tree(from: &Path, to: &Path, method: &mut Option<Method>, out: &mut Materialized) -> Result<(), ImageError> {
    let mut entries: Vec<_> = std::fs::read_dir(from).map_err(io(format!("cannot list {}", from.display())))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        let m = src.symlink_metadata().map_err(io("cannot stat"))?;
        let t = m.file_type();
        if t.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io("cannot read a link"))?;
            std::os::unix::fs::symlink(target, &dst).map_err(io(format!("cannot link {}", dst.display())))?;
        } else if t.is_dir() {
            std::fs::DirBuilder::new().mode(m.permissions().mode() & 0o7777).create(&dst).map_err(io(format!("cannot create {}", dst.display())))?;
            copy_tree(&src, &dst, method, out)?;
            std::fs::set_permissions(&dst, m.permissions()).map_err(io("cannot set permissions"))?;
        } else if t.is_file() {
            share_file(&src, &dst, m.len(), method, out)?;
            out.files += 1;
        }
        // Devices, sockets and fifos are not part of an image (the canonical tar skips
        // them too).
    }
    Ok(())
}

/// Shares one file's data: the method that worked for the previous file is tried first,
/// falling back (reflink, then hard link, then copy) only when it is not supported here.
fn share_file(src: &Path, dst: &Path, len: u64, method: &mut Option<Method>, out: &mut Materialized) -> Result<(), ImageError> {
    if matches!(method, None | Some(Method::Reflink)) {
        match reflink(src, dst) {
            Ok(()) => {
                *method = Some(Method::Reflink);
                return Ok(());
            }
            Err(e) if is_unsupported(&e) => {
                let _ = std::fs::remove_file(dst);
            }
            Err(e) => return Err(ImageError::Io { what: format!("cannot clone {}", src.display()), source: e }),
        }
    }
    if matches!(method, None | Some(Method::Reflink) | Some(Method::Hardlink)) {
        match std::fs::hard_link(src, dst) {
            Ok(()) => {
                *method = Some(Method::Hardlink);
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::EMLINK) => {}
            Err(e) => return Err(ImageError::Io { what: format!("cannot link {}", src.display()), source: e }),
        }
    }
    *method = Some(Method::Copy);
    std::fs::copy(src, dst).map_err(io(format!("cannot copy {}", src.display())))?;
    out.bytes_copied += len;
    Ok(())
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::ENOSYS))
}

/// Clones `src` to a new file `dst` with FICLONE, keeping its permissions.
fn reflink(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(src)?;
    let mode = from.metadata()?.permissions().mode();
    let to = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode & 0o7777).open(dst)?;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only them.
    if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
}

/// The host path of an image path's parent inside `root`, resolving symlinks as if `root`
/// were `/` and creating missing directories; and the final component.
fn parent_in_root(root: &Path, path: &str) -> Result<(PathBuf, String), ImageError> {
    let bad = |m: &str| ImageError::Invalid(format!("edit path `{path}`: {m}"));
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if !path.starts_with('/') || parts.contains(&"..") || path.contains('\0') {
        return Err(bad("must be absolute, without `..`"));
    }
    let Some((last, dirs)) = parts.split_last() else { return Err(bad("is the root")) };
    let mut pending: Vec<String> = dirs.iter().rev().map(|s| s.to_string()).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut here = root.to_path_buf();
        here.extend(&resolved);
        here.push(&part);
        match here.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(bad("too many levels of symbolic links"));
                }
                let target = std::fs::read_link(&here).map_err(io("cannot read a link"))?.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                pending.extend(target.split('/').rev().map(str::to_string));
            }
            Ok(m) if m.is_dir() => resolved.push(part),
            Ok(_) => return Err(bad(&format!("`{part}` on the way is not a directory"))),
            Err(_) => {
                std::fs::DirBuilder::new().mode(0o755).create(&here).map_err(io(format!("cannot create {}", here.display())))?;
                resolved.push(part);
            }
        }
    }
    let mut dir = root.to_path_buf();
    dir.extend(&resolved);
    Ok((dir, last.to_string()))
}

fn remove_any(p: &Path) -> Result<(), ImageError> {
    match p.symlink_metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p).map_err(io(format!("cannot remove {}", p.display()))),
        Ok(_) => std::fs::remove_file(p).map_err(io(format!("cannot remove {}", p.display()))),
    }
}

fn apply(root: &Path, e: &OverlayEdit) -> Result<(), ImageError> {
    use base64::Engine as _;
    match e {
        OverlayEdit::Write { path, mode, uid, gid, contents } => {
            let (dir, name) = parent_in_root(root, path)?;
            let target = dir.join(name);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(contents)
                .map_err(|_| ImageError::Invalid(format!("edit `{path}`: contents are not base64")))?;
            // Unlinked first: the old file may be a hard link to the master's.
            remove_any(&target)?;
            std::fs::write(&target, bytes).map_err(io(format!("cannot write {}", target.display())))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode)).map_err(io("cannot set permissions"))?;
            chown(&target, *uid, *gid);
        }
        OverlayEdit::Remove { path } => {
            let (dir, name) = parent_in_root(root, path)?;
            remove_any(&dir.join(name))?;
        }
        OverlayEdit::Symlink { path, target } => {
            let (dir, name) = parent_in_root(root, path)?;
            let at = dir.join(name);
            remove_any(&at)?;
            std::os::unix::fs::symlink(target, &at).map_err(io(format!("cannot link {}", at.display())))?;
        }
        OverlayEdit::Mkdir { path, mode, uid, gid } => {
            let (dir, name) = parent_in_root(root, path)?;
            let at = dir.join(name);
            if !at.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                remove_any(&at)?;
                std::fs::create_dir(&at).map_err(io(format!("cannot create {}", at.display())))?;
            }
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(*mode)).map_err(io("cannot set permissions"))?;
            chown(&at, *uid, *gid);
        }
    }
    Ok(())
}

/// Sets ownership where the process may (as root); elsewhere the files keep the
/// materializing user's ownership, which is all an unprivileged user can give them.
fn chown(p: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
}
