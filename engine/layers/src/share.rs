//! Building a root from a lower tree without copying its file data: reflinks
//! (copy-on-write clones) first, hard links where clones are not supported, copies where
//! neither is. A root made so must only ever have its files replaced, never written in
//! place (see [`crate::unpack`] with [`crate::Whiteouts::Apply`], which unlinks first).

use crate::{LayerError, io};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How a root shared its lower tree's file data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// An overlay mount: nothing of the lower tree was touched or copied.
    Overlay,
    /// Copy-on-write clones (FICLONE): no data copied, each file independent.
    Reflink,
    /// Hard links to the lower tree's files: no data copied; the files are shared and
    /// must only ever be replaced, never written in place.
    Hardlink,
    /// Plain copies.
    Copy,
}

impl Method {
    /// The name reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Overlay => "overlay",
            Method::Reflink => "reflink",
            Method::Hardlink => "hardlink",
            Method::Copy => "copy",
        }
    }
}

/// What sharing did.
#[derive(Debug, Clone)]
pub struct Shared {
    /// How regular files were shared.
    pub method: Method,
    /// Regular files taken from the lower tree.
    pub files: u64,
    /// Bytes of file data copied (0 for reflinks and hard links).
    pub bytes_copied: u64,
}

/// Builds `to` (created) from the tree `from`, sharing file data where the file system
/// allows. Device nodes and FIFOs are made anew (they hold no data).
pub fn share_tree(from: &Path, to: &Path) -> Result<Shared, LayerError> {
    std::fs::create_dir_all(to).map_err(io(format!("cannot create {}", to.display())))?;
    let mut out = Shared {
        method: Method::Reflink,
        files: 0,
        bytes_copied: 0,
    };
    let mut method = None;
    walk(from, to, &mut method, &mut out)?;
    out.method = method.unwrap_or(Method::Reflink);
    Ok(out)
}

fn owner(p: &Path, m: &std::fs::Metadata) {
    if crate::privileged() {
        let _ = std::os::unix::fs::lchown(p, Some(m.uid()), Some(m.gid()));
    }
}

fn walk(
    from: &Path,
    to: &Path,
    method: &mut Option<Method>,
    out: &mut Shared,
) -> Result<(), LayerError> {
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .map_err(io(format!("cannot list {}", from.display())))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let src = e.path();
        let dst = to.join(e.file_name());
        let m = src.symlink_metadata().map_err(io("cannot stat"))?;
        let t = m.file_type();
        if t.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io("cannot read a link"))?;
            std::os::unix::fs::symlink(target, &dst)
                .map_err(io(format!("cannot link {}", dst.display())))?;
            owner(&dst, &m);
        } else if t.is_dir() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dst)
                .map_err(io(format!("cannot create {}", dst.display())))?;
            walk(&src, &dst, method, out)?;
            std::fs::set_permissions(&dst, m.permissions())
                .map_err(io("cannot set permissions"))?;
            owner(&dst, &m);
        } else if t.is_file() {
            share_file(&src, &dst, m.len(), method, out)?;
            out.files += 1;
        } else {
            // A device node or FIFO: the same kind, mode and number.
            let c = crate::cstring(&dst)?;
            // SAFETY: `c` is a NUL-terminated path that lives for the call.
            if unsafe { libc::mknod(c.as_ptr(), m.mode(), m.rdev()) } == 0 {
                owner(&dst, &m);
            }
        }
    }
    Ok(())
}

/// Shares one file's data: the method that worked for the previous file is tried first,
/// falling back (reflink, then hard link, then copy) only when it is not supported here.
fn share_file(
    src: &Path,
    dst: &Path,
    len: u64,
    method: &mut Option<Method>,
    out: &mut Shared,
) -> Result<(), LayerError> {
    if matches!(method, None | Some(Method::Reflink)) {
        match reflink(src, dst) {
            Ok(()) => {
                *method = Some(Method::Reflink);
                return Ok(());
            }
            Err(e) if is_unsupported(&e) => {
                let _ = std::fs::remove_file(dst);
            }
            Err(e) => {
                return Err(LayerError::Io {
                    what: format!("cannot clone {}", src.display()),
                    source: e,
                });
            }
        }
    }
    if matches!(
        method,
        None | Some(Method::Reflink) | Some(Method::Hardlink)
    ) {
        match std::fs::hard_link(src, dst) {
            Ok(()) => {
                *method = Some(Method::Hardlink);
                return Ok(());
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK)
                ) => {}
            Err(e) => {
                return Err(LayerError::Io {
                    what: format!("cannot link {}", src.display()),
                    source: e,
                });
            }
        }
    }
    *method = Some(Method::Copy);
    std::fs::copy(src, dst).map_err(io(format!("cannot copy {}", src.display())))?;
    out.bytes_copied += len;
    Ok(())
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP)
            | Some(libc::EXDEV)
            | Some(libc::EINVAL)
            | Some(libc::ENOTTY)
            | Some(libc::ENOSYS)
    )
}

/// Clones `src` to a new file `dst` with FICLONE, keeping its permissions and owner.
fn reflink(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = std::fs::File::open(src)?;
    let meta = from.metadata()?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o7777)
        .open(dst)?;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE reads only them.
    if unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    owner(dst, &meta);
    Ok(())
}
