//! Content through the layers: what containerd's conformance suite checks, as our own tests.
