//! Provisioning drivers: how an instance reaches a node (an agent, a BMC, ...).
//!
//! A driver describes and commands; the host moves the bytes (it serves the artifact a
//! node fetches). A driver reaches the network only through `wasi:http`, and only to the
//! hosts its manifest requests and the operator grants.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "driver-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_driver",
        default_bindings_module: "mint_sdk::driver::bindings",
        runtime_path: "mint_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

use crate::{Config, Error};
use bindings::exports::mint::plugin::driver as wit;

pub use wit::{Artifact, Deployment, InstanceState, Node, StatusReport};

crate::common::impl_plugin_error_conversion!(bindings::mint::plugin::types);

/// A provisioning driver. Implement it and name the type in [`export_driver!`](crate::export_driver).
pub trait Driver {
    /// Deploys `deployment` on `node`. Must be idempotent: the host calls it again after a
    /// restart, and an instance already running must not be deployed twice.
    fn deploy(node: &Node, deployment: &Deployment, config: &Config)
    -> Result<StatusReport, Error>;
    /// Removes the instance from the node; an absent instance is not an error.
    fn undeploy(node: &Node, deployment: &Deployment, config: &Config) -> Result<(), Error>;
    /// Reports the instance's state on the node, to follow a deployment or, when
    /// [`checking_health`] says so, to check a running instance.
    fn status(node: &Node, deployment: &Deployment, config: &Config)
    -> Result<StatusReport, Error>;
}

/// During [`Driver::status`]: whether the host is checking the health of an instance it
/// recorded running (true), or following a deployment it started (false). A system found
/// powered off is still coming up in the second case and has failed in the first. Natively
/// (unit tests) false, unless inside [`crate::testing::as_health_check`]. Hosts older than
/// `mint:plugin@0.1.2` do not offer it: a plugin that calls it needs that engine or newer.
#[allow(unreachable_code)]
pub fn checking_health() -> bool {
    #[cfg(target_arch = "wasm32")]
    return bindings::mint::plugin::host::checking_health();
    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::checking_health();
}

impl Node {
    /// A connection property the operator set on the node, such as `agent-url`.
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    /// A property that must be set, as an error naming the node and the key otherwise.
    pub fn require_property(&self, key: &str) -> Result<&str, Error> {
        self.property(key).ok_or_else(|| {
            Error::invalid_input(format!(
                "node `{}` has no `{key}` property; add it to the node's record",
                self.name
            ))
        })
    }
}

impl StatusReport {
    /// A report of `state` with `detail`.
    pub fn new(state: InstanceState, detail: impl Into<String>) -> Self {
        Self {
            state,
            detail: detail.into(),
        }
    }
}

type WitResult<T> = Result<T, bindings::mint::plugin::types::PluginError>;

#[doc(hidden)]
pub fn __deploy<D: Driver>(node: Node, d: Deployment) -> WitResult<StatusReport> {
    let config = crate::common::host_config()?;
    D::deploy(&node, &d, &config).map_err(Into::into)
}
#[doc(hidden)]
pub fn __undeploy<D: Driver>(node: Node, d: Deployment) -> WitResult<()> {
    let config = crate::common::host_config()?;
    D::undeploy(&node, &d, &config).map_err(Into::into)
}
#[doc(hidden)]
pub fn __status<D: Driver>(node: Node, d: Deployment) -> WitResult<StatusReport> {
    let config = crate::common::host_config()?;
    D::status(&node, &d, &config).map_err(Into::into)
}

/// Exports a type that implements [`Driver`] as this component's provisioning driver.
#[macro_export]
macro_rules! export_driver {
    ($ty:ty) => {
        // Only a component exports the world; natively (unit tests) the names the
        // bindings export are not valid symbol names for the platform's linker.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __MintDriverExport;
            type __R<T> = ::core::result::Result<T, $crate::driver::bindings::mint::plugin::types::PluginError>;
            impl $crate::driver::bindings::exports::mint::plugin::driver::Guest for __MintDriverExport {
                fn deploy(node: $crate::driver::Node, d: $crate::driver::Deployment) -> __R<$crate::driver::StatusReport> {
                    $crate::driver::__deploy::<$ty>(node, d)
                }
                fn undeploy(node: $crate::driver::Node, d: $crate::driver::Deployment) -> __R<()> {
                    $crate::driver::__undeploy::<$ty>(node, d)
                }
                fn status(node: $crate::driver::Node, d: $crate::driver::Deployment) -> __R<$crate::driver::StatusReport> {
                    $crate::driver::__status::<$ty>(node, d)
                }
            }
            $crate::driver::bindings::__export_driver!(__MintDriverExport with_types_in $crate::driver::bindings);
        };
    };
}
