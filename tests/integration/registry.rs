//! A read-only OCI registry holding one image, served from the archive the tests write for
//! `ctr images import`: what a pull needs (the API version check, the manifest by tag or
//! digest, blobs by digest), over plain HTTP on 127.0.0.1, which containerd talks to without
//! TLS when a port is given. Lets CRI pull as a kubelet makes it, with no registry reachable.

use std::{
    collections::HashMap, convert::Infallible, fs, io::Read, net::SocketAddr, path::Path, sync::Arc,
};

use hyper::{
    service::{make_service_fn, service_fn},
    Body, Method, Request, Response, Server, StatusCode,
};

/// The image's blobs by digest, and its manifest's digest and media type.
struct Image {
    blobs: HashMap<String, Vec<u8>>,
    manifest: String,
    manifest_type: String,
}

/// A running registry; stops when dropped.
pub struct Registry {
    pub addr: SocketAddr,
    /// The requests it answered, as `METHOD path status`.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registry {
    /// Serves the image of the OCI archive `archive` (its index's first manifest) under any
    /// repository name, as any tag, on a port of 127.0.0.1, from a thread of its own (the
    /// tests block on crictl meanwhile).
    pub fn serve(archive: &Path) -> Registry {
        let image = Arc::new(read_archive(archive));
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let requests = Arc::clone(&log);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let make = make_service_fn(move |_| {
                    let image = Arc::clone(&image);
                    let requests = Arc::clone(&requests);
                    async move {
                        Ok::<_, Infallible>(service_fn(move |req: Request<Body>| {
                            let resp = answer(&image, &req);
                            requests.lock().unwrap().push(format!(
                                "{} {} {}",
                                req.method(),
                                req.uri().path(),
                                resp.status().as_u16()
                            ));
                            async move { Ok::<_, Infallible>(resp) }
                        }))
                    }
                });
                Server::from_tcp(listener)
                    .expect("serving on the listener")
                    .serve(make)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("the registry's server");
            });
        });
        Registry {
            addr,
            log,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// What it answered so far, one request a line.
    pub fn requests(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_archive(archive: &Path) -> Image {
    let mut blobs = HashMap::new();
    let mut index = None;
    let file = fs::File::open(archive).expect("opening the image archive");
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().expect("the image archive") {
        let mut entry = entry.expect("an entry of the image archive");
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            blobs.insert(format!("sha256:{hex}"), data);
        } else if path == "index.json" {
            index = Some(data);
        }
    }
    let index: serde_json::Value =
        serde_json::from_slice(&index.expect("index.json in the archive")).unwrap();
    let first = &index["manifests"][0];
    Image {
        blobs,
        manifest: first["digest"].as_str().unwrap().to_string(),
        manifest_type: first["mediaType"].as_str().unwrap().to_string(),
    }
}

/// The distribution API's answer to `req`: `/v2/`, `/v2/<name>/manifests/<tag or digest>`,
/// `/v2/<name>/blobs/<digest>`; 404 for anything else.
fn answer(image: &Image, req: &Request<Body>) -> Response<Body> {
    let path = req.uri().path();
    let head = req.method() == Method::HEAD;
    if !(req.method() == Method::GET || head) {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    if path == "/v2/" || path == "/v2" {
        return Response::builder()
            .header("Content-Type", "application/json")
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .body(Body::from("{}"))
            .unwrap();
    }
    let found = if let Some((_, reference)) = path.rsplit_once("/manifests/") {
        let digest = if reference.starts_with("sha256:") {
            reference
        } else {
            image.manifest.as_str()
        };
        (digest == image.manifest).then_some((digest, image.manifest_type.as_str()))
    } else if let Some((_, digest)) = path.rsplit_once("/blobs/") {
        Some((digest, "application/octet-stream"))
    } else {
        None
    };
    let Some((digest, content_type)) = found else {
        return status(StatusCode::NOT_FOUND);
    };
    let Some(data) = image.blobs.get(digest) else {
        return status(StatusCode::NOT_FOUND);
    };
    Response::builder()
        .header("Content-Type", content_type)
        .header("Content-Length", data.len())
        .header("Docker-Content-Digest", digest)
        .body(if head {
            Body::empty()
        } else {
            Body::from(data.clone())
        })
        .unwrap()
}

fn status(code: StatusCode) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::empty())
        .unwrap()
}
