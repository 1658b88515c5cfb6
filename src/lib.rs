//! lamina: an overlayfs snapshotter for containerd, served as a proxy plugin.
//! ARCHITECTURE.md maps the modules and the rules between them.

pub mod cli;
pub mod config;
pub mod dirs;
pub mod error;
pub mod grpc;
pub mod layer;
pub mod metrics;
pub mod overlay;
pub mod pool;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod sys;
#[cfg(test)]
mod testing;
