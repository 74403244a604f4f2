//! mint's plugin host: the only crate that knows wasmtime. It loads node-selection
//! policies, image customizers and provisioning drivers as WebAssembly components, checks
//! them against their manifests, and calls them in sandboxes bounded in memory, CPU and
//! wall time. Every answer a plugin gives is checked before it is returned.

#![warn(missing_docs)]

pub mod bindings;
pub mod bundled;
pub mod checks;
pub mod credentials;
pub mod endpoint_tls;
mod error;
pub mod fixture;
pub mod manifest;
pub mod master;
mod outbound;
pub mod package;
mod runtime;
mod state;
pub mod version;

pub use credentials::Credentials;
pub use endpoint_tls::{AGENT_PIN, TlsPolicies};
pub use error::{CallError, LoadError};
pub use manifest::{Capabilities, HostPattern, Kind, Manifest};
pub use runtime::{
    CallObserver, CallRecord, Called, CodeSource, EPOCH_TICK, Grants, Plugin, Runtime,
    RuntimeOptions, Stats,
};
pub use state::{FENCING_TOKEN_HEADER, LogLine, MAX_LOG_LINES};

/// The types plugins exchange with the host, by world, re-exported for the engine.
pub mod types {
    pub use crate::bindings::customizer::exports::mint::plugin::customizer::{
        Edit, FileMeta, Instance, MakeDir, Symlink, WriteFile,
    };
    pub use crate::bindings::customizer::mint::plugin::tier::Peer;
    pub use crate::bindings::driver::exports::mint::plugin::driver::{
        Artifact, Deployment, InstanceState, Node, StatusReport,
    };
    pub use crate::bindings::policy::exports::mint::plugin::node_policy::{
        Candidate, Choice, LabelRef, Placement, Requirements, SelectionRequest,
    };
    pub use crate::bindings::{ErrorKind, IpAddress, PluginError};
}
