//! The first-party plugins built into the engine, so it works out of the box: policies
//! `spread` and `binpack`, customizers `hostname`, `network`, `hosts`, `ssh-keys`, `files`
//! and `cloud-init`, and the drivers `noop`, `agent` (a mint-agent on the node) and `redfish`
//! (the node's BMC).
//! Other plugins load from disk with [`crate::Runtime::load_file`].

use crate::{Grants, LoadError, Manifest, Plugin, Runtime};

/// A plugin compiled into the engine.
#[derive(Debug, Clone, Copy)]
pub struct Bundled {
    /// Its name.
    pub name: &'static str,
    /// Its manifest's text.
    pub manifest: &'static str,
    /// Its component.
    pub wasm: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// The bundled plugin called `name`.
pub fn get(name: &str) -> Option<&'static Bundled> {
    ALL.iter().find(|b| b.name == name)
}

impl Runtime {
    /// Loads a bundled plugin by name; none when there is no such bundled plugin.
    pub fn load_bundled(&self, name: &str) -> Option<Result<Plugin, LoadError>> {
        let b = get(name)?;
        Some(
            Manifest::parse(&format!("bundled:{name}"), b.manifest)
                .and_then(|m| self.load(m, b.wasm, &format!("bundled:{name}"), &Grants::default())),
        )
    }
}
