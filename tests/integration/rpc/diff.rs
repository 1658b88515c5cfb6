//! The Diff service (lamina's differ) at the RPC level: what it refuses, with which code, before
//! it reads anything from containerd. The unpack itself is tested end to end through containerd
//! (`containerd::*_unpacks_through_lamina_s_differ`) and, entry by entry, in `layer/`.

use containerd_client::{
    services::v1::{diff_client::DiffClient, ApplyRequest, DiffRequest},
    types::{Descriptor, Mount as DiffMount},
};
use tonic::{Code, Request};

use crate::util::*;

const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn descriptor(media_type: &str) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: format!("sha256:{}", "0".repeat(64)),
        size: 10,
        annotations: Default::default(),
    }
}

fn wire(m: &Mount) -> DiffMount {
    DiffMount {
        r#type: m.r#type.clone(),
        source: m.source.clone(),
        target: String::new(),
        options: m.options.clone(),
    }
}

fn apply(mounts: Vec<DiffMount>, media_type: &str, ns: Option<&str>) -> Request<ApplyRequest> {
    let mut req = Request::new(ApplyRequest {
        diff: Some(descriptor(media_type)),
        mounts,
        payloads: Default::default(),
    });
    if let Some(ns) = ns {
        req.metadata_mut()
            .insert("containerd-namespace", ns.parse().unwrap());
    }
    req
}

// containerd_address: a socket that cannot exist, whatever containerd the machine runs.
daemon_test!(
    apply_refuses_what_is_not_lamina_s_to_write,
    config = "containerd_address = \"/nonexistent/lamina-test/containerd.sock\"\n",
    |d, mut c| {
        let mut diff = DiffClient::new(c.channel.clone());
        let root = c.prepare("root", "").await.unwrap();
        c.commit("base", "root").await.unwrap();
        let active = c.prepare("active", "base").await.unwrap();
        let view = c.view("view", "base").await.unwrap();
        let ns = Some("default");

        // Without the namespace header, lamina cannot know where to read the layer.
        let res = diff.apply(apply(vec![wire(&active[0])], LAYER, None)).await;
        assert_code(res, Code::FailedPrecondition, "containerd-namespace");

        // Another snapshotter's mounts, a view's, several: Unimplemented (containerd then tries
        // its next differ), naming lamina's root.
        let root_dir = d.root.display().to_string();
        let foreign = DiffMount {
            r#type: "bind".into(),
            source: "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs"
                .into(),
            target: String::new(),
            options: vec!["rw".into(), "rbind".into()],
        };
        for (what, mounts) in [
            ("another snapshotter's", vec![foreign]),
            ("a view's", vec![wire(&view[0])]),
            ("two mounts", vec![wire(&active[0]), wire(&active[0])]),
            ("none", vec![]),
        ] {
            let res = diff.apply(apply(mounts, LAYER, ns)).await;
            match res {
                Err(s) => {
                    assert_eq!(s.code(), Code::Unimplemented, "{what}: {}", s.message());
                    assert!(s.message().contains(&root_dir), "{what}: {}", s.message());
                }
                Ok(r) => panic!("{what}: applied {r:?}"),
            }
        }
        // A committed snapshot's directory, named as an active one's would be: never its upper.
        let mut committed = wire(&root[0]);
        committed.options = vec!["rw".into(), "rbind".into()];
        let upper = active[0]
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .unwrap()
            .to_string();
        let mut other_work = wire(&active[0]);
        for o in &mut other_work.options {
            if o.starts_with("workdir=") {
                *o = format!("workdir={upper}");
            }
        }
        let res = diff.apply(apply(vec![other_work], LAYER, ns)).await;
        assert_code(res, Code::Unimplemented, "workdir");
        // A committed layer is immutable: its directory as a writable bind is refused, and so is a
        // directory no snapshot has.
        let res = diff.apply(apply(vec![committed], LAYER, ns)).await;
        assert_code(res, Code::FailedPrecondition, "committed");
        let mut gone = wire(&root[0]);
        gone.source = gone.source.replace("/snapshots/1/", "/snapshots/999/");
        gone.options = vec!["rw".into(), "rbind".into()];
        let res = diff.apply(apply(vec![gone], LAYER, ns)).await;
        assert_code(res, Code::NotFound, "no snapshot");
        // The active snapshot's own directory as a writable bind: its parents left out, so
        // its whiteouts would be written as deletions.
        let alone = DiffMount {
            r#type: "bind".into(),
            source: upper.clone(),
            target: String::new(),
            options: vec!["rw".into(), "rbind".into()],
        };
        let res = diff.apply(apply(vec![alone], LAYER, ns)).await;
        assert_code(res, Code::FailedPrecondition, "ancestors");

        // Media types lamina's differ does not read.
        for media_type in [
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.oci.image.layer.v1.tar+bzip2",
        ] {
            let res = diff
                .apply(apply(vec![wire(&active[0])], media_type, ns))
                .await;
            assert_code(res, Code::Unimplemented, media_type);
        }

        // lamina's own mounts, but no containerd at containerd_address (none runs here).
        let res = diff.apply(apply(vec![wire(&active[0])], LAYER, ns)).await;
        assert_code(res, Code::Unavailable, "containerd_address");

        // Diff (computing a layer) is containerd's own differ's job.
        let res = diff.diff(Request::new(DiffRequest::default())).await;
        assert_code(res, Code::Unimplemented, "only applies");
    }
);
