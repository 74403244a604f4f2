//! Host-side bindings of the `mint:plugin` WIT package, one module per world. The shared
//! interfaces (`types`, `host`) are generated once, in `policy`, and reused by the other
//! worlds so that one host implementation serves every kind.

// Generated code carries the WIT doc comments, not rustdoc for every item.
#![allow(missing_docs)]

/// The `node-policy-plugin` world.
pub mod policy {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "node-policy-plugin",
        exports: { default: async },
    });
}

/// The `customizer-plugin` world.
pub mod customizer {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "customizer-plugin",
        exports: { default: async },
        with: {
            "mint:plugin/types": super::policy::mint::plugin::types,
            "mint:plugin/host": super::policy::mint::plugin::host,
        },
    });
}

/// The `driver-plugin` world.
pub mod driver {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "driver-plugin",
        exports: { default: async },
        with: {
            "mint:plugin/types": super::policy::mint::plugin::types,
            "mint:plugin/host": super::policy::mint::plugin::host,
        },
    });
}

pub use policy::mint::plugin::types::{ErrorKind, IpAddress, LogLevel, PluginError};
