//! The mint plugin SDK: write node-selection policies, image customizers and provisioning
//! drivers as plain Rust, without touching the generated WebAssembly bindings.
//!
//! A plugin crate enables the feature of its kind (`policy`, `customizer` or `driver`),
//! implements one trait and names its type in one macro:
//!
//! ```ignore
//! use mint_sdk::policy::{Choice, Policy, Request};
//! use mint_sdk::{Config, Error};
//!
//! struct FirstFit;
//!
//! impl Policy for FirstFit {
//!     fn select(request: &Request, _config: &Config) -> Result<Vec<Choice>, Error> {
//!         let chosen: Vec<Choice> = request
//!             .eligible()
//!             .take(request.count as usize)
//!             .map(|(index, _)| Choice::new(index))
//!             .collect();
//!         request.require_count(&chosen)?;
//!         Ok(chosen)
//!     }
//! }
//!
//! mint_sdk::export_policy!(FirstFit);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and load the `.wasm`
//! with a manifest beside it, or pack it (`mint plugin pack`), sign it with minisign and
//! install it into a daemon (`mint plugin install`).
//!
//! Drivers talk HTTP through [`http`] (to the hosts their manifest may reach, and to the
//! node's own endpoint; the host adds the operator's credentials for it) and can ask how
//! long their call has left with [`remaining`]. The same code runs natively in unit tests: the
//! [`testing`] module stands in for the host (configuration, the master's files, the
//! tier's peers, logs).

#![warn(missing_docs)]

extern crate self as mint_sdk;

mod common;
pub mod net;

#[cfg(feature = "customizer")]
pub mod customizer;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "driver")]
pub mod http;
#[cfg(feature = "policy")]
pub mod policy;

pub mod testing;

pub use common::{Config, Error, ErrorKind, log, remaining};

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}
