//! Snapshot directories: where they live under the root, and the only code that creates or
//! deletes them.
//!
//! `layout.rs` names every path and makes, completes and inspects a snapshot's directories;
//! `spares.rs` keeps empty trees ready so that a creation is one rename; `delete.rs` deletes
//! trees on many threads without following symlinks or crossing mounts; `deleter.rs` is the one
//! thread that runs those deletions while lamina serves. None of it knows the store: callers
//! say which IDs to create or delete, in the order the snapshot rules require.

mod delete;
pub mod deleter;
pub mod layout;
pub mod spares;

pub use layout::{delete_tree, DirEntry, Layout, Part};
