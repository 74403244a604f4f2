//! mint's integration tests: one binary, one module per area.

mod cli;
mod crash;
mod daemon;
mod engine;
mod images;
mod model;
mod nodes;
mod plugin_host;
mod store;
mod support;
mod testbed;
