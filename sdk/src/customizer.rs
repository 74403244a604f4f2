//! Image-customization steps: the edits that make one instance different from the master.
//!
//! A customizer gets one instance's identity per call, reads what it needs of the master
//! through [`Context`], and returns [`Edit`]s. The host applies them; the customizer
//! never sees the master's bytes wholesale nor writes anything itself.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "customizer-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_customizer",
        default_bindings_module: "mint_sdk::customizer::bindings",
        runtime_path: "mint_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

use crate::net::{Cidr, ToIpAddr};
use crate::{Config, Error};
use bindings::exports::mint::plugin::customizer as wit;
use bindings::mint::plugin::master;

pub use bindings::mint::plugin::tier::Peer;
pub use bindings::mint::plugin::types::IpAddress;
pub use master::{DirEntry, FileKind, FileStat, FsError};
pub use wit::{Edit, FileMeta, Instance, MakeDir, Symlink, WriteFile};

crate::common::impl_plugin_error_conversion!(bindings::mint::plugin::types);
crate::net::impl_ip_conversions!(bindings::mint::plugin::types::IpAddress);

/// The largest file [`Context::read_file`] asks the host for.
pub const MAX_READ: u64 = 1 << 20;

/// An image-customization step. Implement it and name the type in [`export_customizer!`].
pub trait Customizer {
    /// The edits for `cx.instance`. The host refuses the whole answer if any edit has a
    /// path that is not absolute or holds `..`, or a mode beyond `0o7777`.
    fn customize(cx: &Context<'_>) -> Result<Vec<Edit>, Error>;
}

/// What the host offers a customizer during one call.
pub trait CustomizeHost {
    /// See [`Context::stat`].
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError>;
    /// See [`Context::read_file`].
    fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError>;
    /// See [`Context::list_dir`].
    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError>;
    /// See [`Context::read_link`].
    fn read_link(&self, path: &str) -> Result<Option<String>, FsError>;
    /// See [`Context::peers`].
    fn peers(&self, start: u32, len: u32) -> Vec<Peer>;
}

/// One customize call: the instance, its configuration and the master's files.
pub struct Context<'a> {
    /// The identity minted for this instance.
    pub instance: &'a Instance,
    /// This step's configuration.
    pub config: &'a Config,
    host: &'a dyn CustomizeHost,
}

impl<'a> Context<'a> {
    /// A context over any [`CustomizeHost`]; [`crate::testing::Master`] is one for tests.
    pub fn new(instance: &'a Instance, config: &'a Config, host: &'a dyn CustomizeHost) -> Self {
        Self {
            instance,
            config,
            host,
        }
    }

    /// Metadata of a path in the master, not following a final symlink.
    pub fn stat(&self, path: &str) -> Result<Option<FileStat>, Error> {
        self.host.stat(path).map_err(|e| fs_error(path, e))
    }
    /// Whether a path exists in the master.
    pub fn exists(&self, path: &str) -> Result<bool, Error> {
        Ok(self.stat(path)?.is_some())
    }
    /// A file of the master (at most [`MAX_READ`] bytes), or none when it does not exist.
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        self.host
            .read_file(path, MAX_READ)
            .map_err(|e| fs_error(path, e))
    }
    /// A file of the master as UTF-8 text, or none when it does not exist.
    pub fn read_to_string(&self, path: &str) -> Result<Option<String>, Error> {
        match self.read_file(path)? {
            None => Ok(None),
            Some(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| Error::invalid_input(format!("master file {path} is not UTF-8 text"))),
        }
    }
    /// A directory's entries, sorted by name, or none when it does not exist.
    pub fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, Error> {
        self.host.list_dir(path).map_err(|e| fs_error(path, e))
    }
    /// A symlink's target, or none.
    pub fn read_link(&self, path: &str) -> Result<Option<String>, Error> {
        self.host.read_link(path).map_err(|e| fs_error(path, e))
    }
    /// All K peers of the tier, this instance included, fetched in pages.
    pub fn peers(&self) -> Vec<Peer> {
        let total = self.instance.peer_count;
        let mut all = Vec::with_capacity(total as usize);
        while (all.len() as u32) < total {
            let page = self.host.peers(all.len() as u32, 4096);
            if page.is_empty() {
                break;
            }
            all.extend(page);
        }
        all
    }
    /// The instance's address with its prefix.
    pub fn cidr(&self) -> Cidr {
        Cidr {
            addr: self.instance.address.to_ip(),
            prefix_len: self.instance.prefix_len,
        }
    }
}

fn fs_error(path: &str, e: FsError) -> Error {
    match e {
        FsError::InvalidPath(m) => Error::invalid_input(format!("master path {path}: {m}")),
        FsError::WrongKind(m) => Error::invalid_input(format!("master path {path}: {m}")),
        FsError::TooLarge(n) => {
            Error::invalid_input(format!("master file {path} is too large ({n} bytes)"))
        }
        FsError::Io(m) => Error::external(format!("reading master path {path}: {m}")),
    }
}

impl FileMeta {
    /// Owned by root with `mode`.
    pub fn root(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

impl Edit {
    /// Writes `contents` to `path`, owned by root, with `mode`.
    pub fn write(path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Edit::WriteFile(WriteFile {
            path: path.into(),
            contents: contents.into(),
            meta: FileMeta::root(mode),
        })
    }
    /// Removes `path`.
    pub fn remove(path: impl Into<String>) -> Self {
        Edit::Remove(path.into())
    }
    /// Makes `path` a symlink to `target`.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        Edit::Symlink(Symlink {
            path: path.into(),
            target: target.into(),
        })
    }
    /// Creates directory `path`, owned by root, with `mode`.
    pub fn make_dir(path: impl Into<String>, mode: u32) -> Self {
        Edit::MakeDir(MakeDir {
            path: path.into(),
            meta: FileMeta::root(mode),
        })
    }
    /// The path the edit touches.
    pub fn path(&self) -> &str {
        match self {
            Edit::WriteFile(w) => &w.path,
            Edit::Remove(p) => p,
            Edit::Symlink(s) => &s.path,
            Edit::MakeDir(d) => &d.path,
        }
    }
}

/// The host's side of [`CustomizeHost`] inside a component.
#[cfg(target_arch = "wasm32")]
struct ComponentHost;

#[cfg(target_arch = "wasm32")]
impl CustomizeHost for ComponentHost {
    fn stat(&self, path: &str) -> Result<Option<FileStat>, FsError> {
        master::stat(path)
    }
    fn read_file(&self, path: &str, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError> {
        master::read_file(path, max_bytes)
    }
    fn list_dir(&self, path: &str) -> Result<Option<Vec<DirEntry>>, FsError> {
        master::list_dir(path)
    }
    fn read_link(&self, path: &str) -> Result<Option<String>, FsError> {
        master::read_link(path)
    }
    fn peers(&self, start: u32, len: u32) -> Vec<Peer> {
        bindings::mint::plugin::tier::peers(start, len)
    }
}

#[doc(hidden)]
pub fn __customize<C: Customizer>(
    instance: Instance,
) -> Result<Vec<Edit>, bindings::mint::plugin::types::PluginError> {
    let config = crate::common::host_config()?;
    #[cfg(target_arch = "wasm32")]
    let host = ComponentHost;
    #[cfg(not(target_arch = "wasm32"))]
    let host = crate::testing::Master::new();
    C::customize(&Context::new(&instance, &config, &host)).map_err(Into::into)
}

/// Exports a type that implements [`Customizer`] as this component's customization step.
#[macro_export]
macro_rules! export_customizer {
    ($ty:ty) => {
        // Only a component exports the world; natively (unit tests) the names the
        // bindings export are not valid symbol names for the platform's linker.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __MintCustomizerExport;
            impl $crate::customizer::bindings::exports::mint::plugin::customizer::Guest for __MintCustomizerExport {
                fn customize(
                    instance: $crate::customizer::Instance,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::customizer::Edit>,
                    $crate::customizer::bindings::mint::plugin::types::PluginError,
                > {
                    $crate::customizer::__customize::<$ty>(instance)
                }
            }
            $crate::customizer::bindings::__export_customizer!(__MintCustomizerExport with_types_in $crate::customizer::bindings);
        };
    };
}
