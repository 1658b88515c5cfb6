//! Each RPC's semantics and error codes, filters, and concurrency.
