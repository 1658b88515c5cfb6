//! Generates the gRPC code lamina serves, with the same tonic/prost versions that the
//! `containerd-snapshots` crate uses, so everything shares one gRPC stack:
//! - lamina's own admin API, from proto/ (needs `protoc`, Debian: protobuf-compiler, as that
//!   crate's build does);
//! - the server side of containerd's Snapshots service, defined here method by method over the
//!   message types `containerd-snapshots` generates. The crate's own generated server would do,
//!   but for List: its messages are encoded by lamina itself (see `src/grpc/list.rs`), which
//!   needs a codec of its own for that one method, and only a service defined here can say so;
//! - the server side of containerd's Diff service, the same way over `containerd-client`'s
//!   messages.

use tonic_build::manual::{Method, Service};

/// containerd's messages, as `containerd-snapshots` generates them.
const V1: &str = "containerd_snapshots::api::snapshots::v1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&["proto/lamina/admin/v1/admin.proto"], &["proto"])?;

    // (method, request, response), each a unary call with prost's codec. google.protobuf.Empty
    // is `()` to prost; the generator takes only paths, hence `crate::grpc::Empty` for it.
    let unary = [
        (
            "Prepare",
            "PrepareSnapshotRequest",
            "PrepareSnapshotResponse",
        ),
        ("View", "ViewSnapshotRequest", "ViewSnapshotResponse"),
        ("Mounts", "MountsRequest", "MountsResponse"),
        ("Commit", "CommitSnapshotRequest", "()"),
        ("Remove", "RemoveSnapshotRequest", "()"),
        ("Stat", "StatSnapshotRequest", "StatSnapshotResponse"),
        ("Update", "UpdateSnapshotRequest", "UpdateSnapshotResponse"),
        ("Usage", "UsageRequest", "UsageResponse"),
        ("Cleanup", "CleanupRequest", "()"),
    ];
    let mut service = Service::builder()
        .name("Snapshots")
        .package("containerd.services.snapshots.v1");
    for (route, request, response) in unary {
        let output = match response {
            "()" => "crate::grpc::Empty".to_string(),
            name => format!("{V1}::{name}"),
        };
        service = service.method(
            Method::builder()
                .name(route.to_lowercase())
                .route_name(route)
                .input_type(format!("{V1}::{request}"))
                .output_type(output)
                .codec_path("tonic::codec::ProstCodec")
                .build(),
        );
    }
    // List streams messages that are already encoded.
    service = service.method(
        Method::builder()
            .name("list")
            .route_name("List")
            .input_type(format!("{V1}::ListSnapshotsRequest"))
            .output_type("bytes::Bytes")
            .codec_path("crate::grpc::list::ListCodec")
            .server_streaming()
            .build(),
    );
    // containerd's Diff service (lamina's differ), over the messages `containerd-client`
    // generates from the .proto files it ships, but for ApplyRequest: containerd 2.x added
    // `sync_fs` to it, which that crate's files predate, so lamina declares the message itself
    // (src/grpc/diff.rs) with the crate's Descriptor and Mount.
    const DIFF: &str = "containerd_client::services::v1";
    let diff = Service::builder()
        .name("Diff")
        .package("containerd.services.diff.v1")
        .method(
            Method::builder()
                .name("apply")
                .route_name("Apply")
                .input_type("crate::grpc::diff::ApplyRequest")
                .output_type(format!("{DIFF}::ApplyResponse"))
                .codec_path("tonic::codec::ProstCodec")
                .build(),
        )
        .method(
            Method::builder()
                .name("diff")
                .route_name("Diff")
                .input_type(format!("{DIFF}::DiffRequest"))
                .output_type(format!("{DIFF}::DiffResponse"))
                .codec_path("tonic::codec::ProstCodec")
                .build(),
        )
        .build();
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[service.build(), diff]);
    Ok(())
}
