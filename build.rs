//! Compiles lamina's own admin API (proto/) with the same tonic/prost versions that the
//! `containerd-snapshots` crate uses for the Snapshots API, so both share one gRPC stack.
//! Needs `protoc` (Debian: protobuf-compiler), as that crate's build does.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&["proto/lamina/admin/v1/admin.proto"], &["proto"])?;
    Ok(())
}
