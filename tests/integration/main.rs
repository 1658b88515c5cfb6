//! One integration-test binary: every test starts the real `lamina serve` on a temporary root
//! and socket, talks to it with containerd's generated gRPC client, and mounts what it returns.
//!
//! These tests need root (lamina probes overlayfs at start-up, and the tests mount). Without
//! root they print why and skip, unless `CI` is set: then they fail. Each is declared with
//! `root_test!` or `daemon_test!` (see `util`), which makes that so.

mod util;

mod admin;
mod architecture;
mod clients;
mod containerd;
#[path = "../support/containerd.rs"]
mod containerd_support;
mod crash;
mod cri;
#[path = "../support/cri.rs"]
mod cri_support;
mod differ;
mod faults;
mod hostile;
mod layers;
mod model;
#[path = "../support/oci.rs"]
mod oci_support;
mod powercut;
mod registry;
mod rollback;
mod rpc;
mod systemd;
