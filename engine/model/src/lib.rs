//! mint's domain model: address plans and the identities minted from them, host-name
//! patterns, and the states of instances and nodes with their legal transitions.
//!
//! Architecture invariant: this crate does no IO and knows no async runtime, store or
//! plugin host. Everything here is a pure function of its inputs, so the pool's rules can
//! be tested (and model-checked) without a daemon.

#![warn(missing_docs)]

pub mod address;
pub mod hostname;
pub mod plan;
pub mod records;
pub mod state;

pub use address::{AddressPlan, Cidr, PlanError};
pub use hostname::{HostnamePattern, PatternError};
pub use state::{InstanceState, NodeState, Transition};
