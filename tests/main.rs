//! mint's integration tests: one binary, one module per area.

mod auth;
mod blob_cache;
mod bmc;
mod cli;
mod crash;
mod daemon;
mod docs;
mod engine;
mod etcd;
mod images;
mod libvirt;
mod model;
mod netboot;
mod nodes;
mod packages;
mod plugin_host;
mod python;
mod real_os;
mod redfish;
mod running;
mod sim;
mod store;
mod support;
mod testbed;
mod tls;
mod vms;
