//! Seeded fuzzing: random filter strings through List, random requests with random field
//! values at every RPC, and raw bytes that are not a valid request at all. The seeds and sizes
//! are fixed unless `LAMINA_FUZZ_SEED`, `LAMINA_FUZZ_FILTERS` and `LAMINA_FUZZ_REQUESTS` say
//! otherwise.

use std::collections::BTreeMap;

use prost::bytes::{Buf, BufMut};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Code, Status,
};

use super::*;

// ---------------------------------------------------------------------------------------------
// Random filters and requests
// ---------------------------------------------------------------------------------------------

/// Pieces of the filter language and things around it.
const FILTER_PIECES: &[&str] = &[
    "name", "parent", "kind", "labels", "a", "b", "1", "view", ".", ".", ",", "==", "!=", "~=",
    "=", "!", "~", "\"", "\"", "/", "|", "\\", "\\x", "\\u00", "\\n", "\\q", " ", "\t", "\n", "\0",
    "(", ")", "[", "]", "*", "+", "?", "{", "}", "^", "$", "é", "🙂", "\u{7f}", "_", "-",
];

/// Filters that parse, for mutation.
const GOOD_FILTERS: &[&str] = &[
    "name==base",
    "kind==view",
    "kind!=active,parent",
    "labels.\"containerd.io/snapshot/l\"==1",
    "labels.l~=^2",
    "name~=/^ba/",
    "name~=|s|,parent!=\"\"",
    "parent==base,labels.l",
    "name==\"a\\x41\\u00e9\"",
    "labels.a.b!=x",
];

/// Half of the time a valid filter with a few random edits, else random pieces.
fn random_filter(rng: &mut Rng) -> String {
    if rng.chance(50) {
        let mut f: Vec<char> = rng.pick(GOOD_FILTERS).chars().collect();
        for _ in 0..rng.below(3) {
            let piece: Vec<char> = rng.pick(FILTER_PIECES).chars().collect();
            let at = rng.below(f.len() + 1);
            match rng.below(3) {
                0 => {
                    f.splice(at..at, piece);
                }
                1 if at < f.len() => {
                    f.remove(at);
                }
                _ if at < f.len() => {
                    f.splice(at..at + 1, piece);
                }
                _ => {}
            }
        }
        return f.into_iter().collect();
    }
    (0..1 + rng.below(12))
        .map(|_| {
            if rng.chance(10) {
                char::from_u32(rng.below(0x3000) as u32)
                    .unwrap_or('x')
                    .to_string()
            } else {
                rng.pick(FILTER_PIECES).to_string()
            }
        })
        .collect()
}

daemon_test!(random_filters_parse_or_are_invalid_arguments, |d| {
    let (mut c, before) = seeded(&d).await;
    let n = env_or("LAMINA_FUZZ_FILTERS", 3000);
    let mut rng = Rng::new(env_or("LAMINA_FUZZ_SEED", 0xf1_17e5));
    let (mut ok, mut invalid) = (0, 0);
    for _ in 0..n {
        let filters: Vec<String> = (0..1 + rng.below(3))
            .map(|_| random_filter(&mut rng))
            .collect();
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        tried(1);
        match c.list(&refs).await {
            Ok(names) => {
                ok += 1;
                assert!(names.len() <= 4, "{filters:?} listed {names:?}");
            }
            Err(s)
                if s.code() == Code::InvalidArgument && s.message().contains("does not parse") =>
            {
                invalid += 1
            }
            Err(s) => panic!("List {filters:?}: {:?} {}", s.code(), show(s.message())),
        }
    }
    assert_eq!(stored(&mut c, &d).await, before);
    eprintln!("hostile: random filters: {n} tried, {ok} parsed, {invalid} InvalidArgument");
    report("random filters", n as usize);
});

/// A random string: often one of the keys in play, else odd characters, sometimes huge.
fn random_string(rng: &mut Rng, pool: &[&str]) -> String {
    match rng.below(100) {
        0..=49 => rng.pick(pool).to_string(),
        50..=54 => String::new(),
        55..=57 => "k".repeat(4096 + rng.below(2)),
        _ => (0..rng.below(12))
            .map(|_| {
                *rng.pick(&[
                    'a', 'b', '/', '.', '\0', '\n', ' ', '"', ',', '=', 'é', '🙂', '\u{1}',
                ])
            })
            .collect(),
    }
}

fn random_labels(rng: &mut Rng, pool: &[&str]) -> HashMap<String, String> {
    (0..rng.below(4))
        .map(|_| {
            let k = if rng.chance(80) {
                format!("containerd.io/snapshot/{}", rng.below(3))
            } else {
                random_string(rng, &["l", ""])
            };
            let v = match rng.below(10) {
                0 => "v".repeat(4097),
                1 => String::new(),
                _ => random_string(rng, pool),
            };
            (k, v)
        })
        .collect()
}

/// A request to a random RPC, with random fields drawn from `pool` and beyond.
fn random_call(rng: &mut Rng, pool: &[&str]) -> Call {
    let s = |rng: &mut Rng| random_string(rng, pool);
    match rng.below(10) {
        0 => {
            let (k, p, l) = (s(rng), s(rng), random_labels(rng, pool));
            Call::Prepare(k, p, l)
        }
        1 => {
            let (k, p, l) = (s(rng), s(rng), random_labels(rng, pool));
            Call::View(k, p, l)
        }
        2 => Call::Mounts(s(rng)),
        3 => {
            let (n, k, l) = (s(rng), s(rng), random_labels(rng, pool));
            Call::Commit(n, k, l)
        }
        4 => Call::Remove(s(rng)),
        5 => Call::Stat(s(rng)),
        6 => {
            let inf = rng
                .chance(95)
                .then(|| info(&s(rng), random_labels(rng, pool)));
            let paths = rng.chance(80).then(|| {
                (0..rng.below(3))
                    .map(|_| match rng.below(4) {
                        0 => "labels".to_string(),
                        1 => format!("labels.containerd.io/snapshot/{}", rng.below(3)),
                        2 => format!("labels.{}", s(rng)),
                        _ => s(rng),
                    })
                    .collect()
            });
            Call::Update(inf, paths)
        }
        7 => Call::Usage(s(rng)),
        8 => Call::List((0..rng.below(3)).map(|_| random_filter(rng)).collect()),
        _ => Call::Cleanup,
    }
}

daemon_test!(random_requests_get_only_documented_codes, |mut d| {
    let mut c = big_client(&d).await;
    seed(&mut c).await;
    let n = env_or("LAMINA_FUZZ_REQUESTS", 2000);
    let mut rng = Rng::new(env_or("LAMINA_FUZZ_SEED", 0xf1_17e5) ^ 0x5eed);
    let pool = [
        "base", "act", "vw", "solo", "a", "b", "c", "a/..", "\0", "x\ny",
    ];
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let call = random_call(&mut rng, &pool);
        let res = call.send(&mut c).await.map(|_| ());
        tried(1);
        let code = match &res {
            Ok(()) => Code::Ok,
            Err(st) => st.code(),
        };
        *codes.entry(format!("{}:{code:?}", call.rpc())).or_default() += 1;
        match res {
            Ok(()) => {}
            Err(st)
                if matches!(
                    st.code(),
                    Code::NotFound
                        | Code::AlreadyExists
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                ) =>
            {
                assert!(
                    !st.message().is_empty(),
                    "request {i}: {:?} without a message",
                    st.code()
                );
            }
            Err(st) => panic!(
                "request {i} ({}): undocumented {:?}: {}",
                call.rpc(),
                st.code(),
                show(st.message())
            ),
        }
    }
    // Still serving; the store is consistent: one directory per snapshot after Cleanup, all
    // of them lamina's, and the same after a restart.
    c.cleanup().await.unwrap();
    let after = stored(&mut c, &d).await;
    assert_eq!(
        after.0.len(),
        after.2.len(),
        "snapshots vs directories: {after:?}"
    );
    check_tree(&d);
    drop(c);
    d.restart().await;
    let mut c = big_client(&d).await;
    assert_eq!(
        stored(&mut c, &d).await,
        after,
        "the fuzzed store did not survive a restart"
    );
    eprintln!("hostile: random requests: {n} tried, outcomes {codes:?}");
    report("random requests", n as usize);
});

// ---------------------------------------------------------------------------------------------
// Bytes that are not a valid request at all
// ---------------------------------------------------------------------------------------------

/// Sends and receives raw message bodies, so requests can be anything.
#[derive(Default, Clone)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// One protobuf length-delimited field.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for mut v in [((tag << 3) | 2) as u64, bytes.len() as u64] {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out.extend_from_slice(bytes);
    out
}

async fn raw_call(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    grpc.ready().await.expect("connection ready");
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!(
        "/containerd.services.snapshots.v1.Snapshots/{method}"
    ))
    .unwrap();
    if method == "List" {
        let mut stream = grpc
            .server_streaming(tonic::Request::new(body), path, RawCodec)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend(m);
        }
        return Ok(out);
    }
    Ok(grpc
        .unary(tonic::Request::new(body), path, RawCodec)
        .await?
        .into_inner())
}

daemon_test!(malformed_requests_are_refused_and_change_nothing, |d| {
    let (mut c, before) = seeded(&d).await;
    // The raw requests go over a connection of their own.
    let mut grpc = tonic::client::Grpc::new(channel(&d.socket).await.unwrap());
    let methods = [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "List",
        "Cleanup",
    ];
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0;

    // Keys, names, parents and label values that are not UTF-8 (protobuf strings must be).
    let bad_utf8: &[u8] = b"k\xff\xfe/..";
    let mut bodies: Vec<(&str, Vec<u8>)> = vec![
        ("Prepare", field(2, bad_utf8)),
        ("Prepare", [field(2, b"fresh"), field(3, bad_utf8)].concat()),
        (
            "Prepare",
            [
                field(2, b"fresh"),
                field(4, &[field(1, b"l"), field(2, bad_utf8)].concat()),
            ]
            .concat(),
        ),
        ("View", field(2, bad_utf8)),
        ("Mounts", field(2, bad_utf8)),
        ("Commit", [field(2, bad_utf8), field(3, b"act")].concat()),
        ("Remove", field(2, bad_utf8)),
        ("Stat", field(2, b"base\xc0")),
        ("Update", field(2, &field(1, bad_utf8))),
        ("Usage", field(2, bad_utf8)),
        ("List", field(2, bad_utf8)),
    ];
    // Random bytes at every method.
    let mut rng = Rng::new(0xbad_b0d1e5);
    for i in 0..300 {
        let len = rng.below(64);
        let body: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        bodies.push((methods[i % methods.len()], body));
    }
    for (method, body) in bodies {
        count += 1;
        tried(1);
        match raw_call(&mut grpc, method, body.clone()).await {
            Ok(_) => *seen.entry(format!("{method}:Ok")).or_default() += 1,
            Err(s) => {
                // Undecodable bytes are refused by the gRPC layer before lamina sees them:
                // tonic (like Go's gRPC) answers Internal "failed to decode Protobuf message".
                assert!(
                    matches!(
                        s.code(),
                        Code::InvalidArgument
                            | Code::Internal
                            | Code::NotFound
                            | Code::AlreadyExists
                            | Code::FailedPrecondition
                    ),
                    "{method} {body:?}: {:?} {}",
                    s.code(),
                    show(s.message())
                );
                assert!(!s.message().is_empty());
                *seen.entry(format!("{method}:{:?}", s.code())).or_default() += 1;
            }
        }
    }
    // Random bytes that happen to decode are valid requests with odd fields; whatever they
    // did, it went through lamina's rules. Only the seeded store must be untouched apart
    // from what such requests could legally do; the seeded snapshots are all still there.
    let after = stored(&mut c, &d).await;
    for (name, ..) in &before.0 {
        assert!(
            after.0.iter().any(|(n, ..)| n == name),
            "{name} disappeared: {after:?}"
        );
    }
    check_tree(&d);
    eprintln!("hostile: malformed requests: {count} tried, outcomes {seen:?}");
    report("malformed requests", count);
});
