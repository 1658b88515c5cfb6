//! Filters, field paths, wrong kinds and missing keys: each refused with its documented code
//! and a message that names what was wrong, and none changes what is stored.

use std::sync::atomic::Ordering;

use tonic::Code;

use super::*;

// ---------------------------------------------------------------------------------------------
// Filters and field paths
// ---------------------------------------------------------------------------------------------

daemon_test!(filters_that_do_not_parse_are_invalid_arguments, |d| {
    let (mut c, before) = seeded(&d).await;
    let start = TRIED.load(Ordering::Relaxed);
    let mut bad: Vec<String> = [
        "name==",
        "name=",
        "name=~a",
        "name===a",
        "==a",
        "!=a",
        "name==a,",
        ",name",
        "name,,kind",
        "name==a b",
        "name==\"open",
        "labels.\"open",
        "name==/re/",
        "/name/==a",
        "|name|==a",
        "name~=\"(\"",
        "name~=/[/",
        "name~=|a{2,1}|",
        "name~=",
        "labels.",
        ".name",
        "name.",
        "name==\"\\q\"",
        "na\0me",
        "name==\"\\xff\"",
        "name==\"\\u12\"",
        "name==\"\\U0011ffff\"",
        "name!",
        "name ~ a",
        "name==a\nkind==view",
        "🙂",
        "name==\"a\"b",
        "name~=a{1000}{1000}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    bad.push(format!("name~={}", "(".repeat(300)));
    bad.push(format!("name=={}", "\"".repeat(300)));
    for f in &bad {
        refused(
            &format!("List {}", show(f)),
            c.list(&[f]).await,
            Code::InvalidArgument,
            &["filter", "does not parse"],
        );
        // A good filter beside a bad one does not make the list parse.
        refused(
            &format!("List kind==view + {}", show(f)),
            c.list(&["kind==view", f]).await,
            Code::InvalidArgument,
            &["does not parse"],
        );
    }
    // The filter language's own edge cases that do parse.
    for ok in [
        "",
        "name",
        "kind==view,kind!=view",
        "labels.\"\"",
        "name~=\"\"",
        "name==\"\\x00\"",
    ] {
        tried(1);
        c.list(&[ok])
            .await
            .unwrap_or_else(|e| panic!("List {ok:?}: {e:?}"));
    }
    tried(1);
    let many: Vec<String> = (0..64).map(|i| format!("name==n{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(c.list(&refs).await.unwrap(), Vec::<String>::new());
    assert_eq!(stored(&mut c, &d).await, before);
    report("filters", TRIED.load(Ordering::Relaxed) - start);
});

// What a List's filters may cost is bounded: how many strings, how long each, how many
// regular expressions and how big each compiles. Within the limits filters work as ever;
// beyond them the List is refused, and the message names the limit.
daemon_test!(
    filters_beyond_lamina_s_limits_are_refused_naming_the_limit,
    |d| {
        let (mut c, before) = seeded(&d).await;
        let start = TRIED.load(Ordering::Relaxed);
        let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();

        // How many: 64 strings, each a selector of its own.
        let mut filters: Vec<String> = (1..64).map(|i| format!("name==n{i}")).collect();
        filters.push("name==base".into());
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        tried(1);
        assert_eq!(c.list(&refs).await.unwrap(), ["base"]);
        filters.push("name==act".into());
        let refs: Vec<&str> = filters.iter().map(String::as_str).collect();
        refused(
            "List of 65 filters",
            c.list(&refs).await,
            Code::InvalidArgument,
            &["65 filters", "at most 64"],
        );

        // How long: 16 KiB each, room for an equality on the longest label containerd allows.
        let long = |len: usize| {
            let f = format!("name==\"{}\"", "x".repeat(len - 8));
            assert_eq!(f.len(), len);
            f
        };
        tried(1);
        assert!(c
            .list(&["name==none", &long(16 << 10)])
            .await
            .unwrap()
            .is_empty());
        refused(
            "List of a 16385-byte filter",
            c.list(&["name==none", &long((16 << 10) + 1)]).await,
            Code::InvalidArgument,
            &["filter #2", "16385 bytes", "at most 16384"],
        );

        // How many regular expressions: 16 in all the strings together.
        let regexes = |n: usize| -> Vec<String> {
            let all: Vec<String> = (0..n).map(|i| format!("name~=^[a-z]{{{i}}}$")).collect();
            vec![all[..n / 2].join(","), all[n / 2..].join(",")]
        };
        let ok = strs(&regexes(16));
        let refs: Vec<&str> = ok.iter().map(String::as_str).collect();
        tried(1);
        c.list(&refs).await.unwrap();
        let bad = strs(&regexes(17));
        let refs: Vec<&str> = bad.iter().map(String::as_str).collect();
        refused(
            "List of 17 regular expressions",
            c.list(&refs).await,
            Code::InvalidArgument,
            &["regular expressions", "at most 16"],
        );

        // How big each compiles: 256 KiB. Unicode classes repeated grow fast (`.{500}` is about
        // 500 KB compiled, well within the regex crate's own 10 MiB default).
        for ok in [
            "name~=^sha256:[a-f0-9]{64}$",
            "name~=\\w+",
            "name~=/.{100}/",
        ] {
            tried(1);
            c.list(&[ok])
                .await
                .unwrap_or_else(|e| panic!("List {ok:?}: {e:?}"));
        }
        for big in ["name~=/.{500}/", "labels.l~=\\w{64}", "name~=[\\p{L}]{20}"] {
            refused(
                &format!("List {big:?}"),
                c.list(&[big]).await,
                Code::InvalidArgument,
                &["does not parse", "regular expression", "262144 bytes"],
            );
        }

        assert_eq!(stored(&mut c, &d).await, before);
        report("filter limits", TRIED.load(Ordering::Relaxed) - start);
    }
);

// A refusal names what was wrong, but does not echo a huge input whole: a status message
// travels in an HTTP/2 header, and a multi-megabyte one costs the client dearly (tonic's
// client takes tens of seconds to receive a 2 MiB one) and helps no person reading it.
daemon_test!(refusals_do_not_echo_huge_input_whole, |d| {
    const LIMIT: usize = 8 << 10;
    let (mut c, before) = seeded(&d).await;
    let big = 64 << 10;
    // Filters as long as lamina takes them (16 KiB; longer ones are refused for their length
    // alone), so that they reach the parser.
    let near = (16 << 10) - 16;
    let filters = [
        format!("name~={}", "(".repeat(near)),
        format!("name=={}", "\"".repeat(near)),
        format!("name==a {}", "b".repeat(near)),
        format!("{}==a", "\u{1}".repeat(near)),
    ];
    let mut table: Vec<Refusal> = filters
        .iter()
        .enumerate()
        .map(|(i, f)| {
            refusal(
                format!("List of {}-byte bad filter #{i}", f.len()),
                Call::list(&[f]),
                Code::InvalidArgument,
                &["filter", "does not parse"],
            )
        })
        .collect();
    let path = format!("labels{}", "x".repeat(big));
    table.extend([
        refusal(
            "Update of a 64 KiB field path",
            Call::update("act", labels(&[("a", "1")]), &[&path]),
            Code::InvalidArgument,
            &["labels"],
        ),
        refusal(
            "Stat of a 1 MiB key",
            Call::Stat("k".repeat(1 << 20)),
            Code::InvalidArgument,
            &["at most 4096"],
        ),
        refusal(
            "Stat of a 4097-byte key",
            Call::Stat("k".repeat(4097)),
            Code::InvalidArgument,
            &["at most 4096"],
        ),
        refusal(
            "Prepare with a 1 MiB label",
            Call::prepare("fresh", "").labelled(labels(&[("k", &"v".repeat(1 << 20))])),
            Code::InvalidArgument,
            &["4096"],
        ),
    ]);
    let refusals = refuse_all(&mut c, &table).await;
    assert_eq!(stored(&mut c, &d).await, before);
    let long: Vec<_> = table
        .iter()
        .zip(&refusals)
        .map(|(r, status)| (&r.what, status.message().len()))
        .filter(|(_, len)| *len > LIMIT)
        .collect();
    assert!(
        long.is_empty(),
        "refusals whose message echoes the input whole (bytes; limit {LIMIT}): {long:?}"
    );
    report("huge input echoed", table.len());
});

daemon_test!(update_refuses_fields_it_cannot_change, |d| {
    let (mut c, before) = seeded(&d).await;
    let start = TRIED.load(Ordering::Relaxed);
    let new = || labels(&[("containerd.io/snapshot/l", "changed"), ("n", "new")]);
    let mut table = Vec::new();
    for paths in [
        vec!["parent"],
        vec!["name"],
        vec!["kind"],
        vec!["created_at"],
        vec!["updated_at"],
        vec!["Labels"],
        vec!["labelsx"],
        vec!["labels/n"],
        vec![""],
        vec![" labels"],
        vec!["labels", "parent"],
        vec!["labels.n", "name"],
        vec!["labels.n", "labels.containerd.io/snapshot/l", "kind"],
    ] {
        let bad = paths
            .iter()
            .find(|p| **p != "labels" && !p.starts_with("labels."))
            .unwrap();
        for key in ["base", "act", "vw"] {
            table.push(refusal(
                format!("Update {key} {paths:?}"),
                Call::update(key, new(), &paths),
                Code::InvalidArgument,
                &[&format!("{bad:?}"), "labels", key],
            ));
        }
    }
    table.extend([
        refusal(
            "Update without info",
            Call::Update(None, None),
            Code::InvalidArgument,
            &["info"],
        ),
        refusal(
            "Update without info, with paths",
            Call::Update(None, Some(vec!["labels".into()])),
            Code::InvalidArgument,
            &["info"],
        ),
        refusal(
            "Update of an unknown key with a bad path",
            Call::update("nope", new(), &["parent"]),
            Code::NotFound,
            &["nope", "does not exist"],
        ),
    ]);
    refuse_all(&mut c, &table).await;
    assert_eq!(
        stored(&mut c, &d).await,
        before,
        "a refused Update changed labels"
    );
    report("update paths", TRIED.load(Ordering::Relaxed) - start);
});

// ---------------------------------------------------------------------------------------------
// Wrong kinds and missing keys
// ---------------------------------------------------------------------------------------------

daemon_test!(wrong_kinds_and_missing_keys_get_their_codes, |d| {
    let (mut c, before) = seeded(&d).await;
    let start = TRIED.load(Ordering::Relaxed);
    use Code::*;

    let mut table = Vec::new();
    for parent in ["act", "vw", "solo"] {
        table.extend([
            refusal(
                format!("Prepare on {parent}"),
                Call::prepare("fresh", parent),
                InvalidArgument,
                &[parent, "committed"],
            ),
            refusal(
                format!("View on {parent}"),
                Call::view("fresh", parent),
                InvalidArgument,
                &[parent, "committed"],
            ),
        ]);
    }
    for (what, call) in [
        (
            "Prepare on a missing parent",
            Call::prepare("fresh", "gone"),
        ),
        ("View on a missing parent", Call::view("fresh", "gone")),
    ] {
        table.push(refusal(what, call, NotFound, &["gone", "does not exist"]));
    }
    for key in ["base", "act", "vw", "solo"] {
        table.extend([
            refusal(
                format!("Prepare {key} again"),
                Call::prepare(key, ""),
                AlreadyExists,
                &[key, "already exists"],
            ),
            refusal(
                format!("View {key} again"),
                Call::view(key, "base"),
                AlreadyExists,
                &[key, "already exists"],
            ),
        ]);
    }
    for (what, call, code, needles) in [
        (
            "Commit of a view",
            Call::commit("fresh", "vw"),
            FailedPrecondition,
            &["vw", "view"][..],
        ),
        (
            "Commit of a committed snapshot",
            Call::commit("fresh", "base"),
            FailedPrecondition,
            &["base", "committed"],
        ),
        (
            "Commit onto an existing name",
            Call::commit("solo", "act"),
            AlreadyExists,
            &["solo", "already exists"],
        ),
        (
            "Commit onto its own key",
            Call::commit("act", "act"),
            AlreadyExists,
            &["act"],
        ),
        (
            "Commit of a missing key",
            Call::commit("fresh", "gone"),
            NotFound,
            &["gone", "does not exist"],
        ),
        (
            "Commit of a missing key onto a taken name",
            Call::commit("base", "gone"),
            NotFound,
            &["gone"],
        ),
        (
            "Mounts of a committed snapshot",
            Call::Mounts("base".into()),
            FailedPrecondition,
            &["base", "committed"],
        ),
        (
            "Remove of a parent",
            Call::Remove("base".into()),
            FailedPrecondition,
            &["base", "child"],
        ),
    ] {
        table.push(refusal(what, call, code, needles));
    }
    for call in [
        Call::Mounts("gone".into()),
        Call::Remove("gone".into()),
        Call::Stat("gone".into()),
        Call::Usage("gone".into()),
        Call::update("gone", labels(&[("a", "1")]), &[]),
    ] {
        let what = format!("{} of a missing key", call.rpc());
        table.push(refusal(what, call, NotFound, &["gone", "does not exist"]));
    }
    refuse_all(&mut c, &table).await;
    assert_eq!(stored(&mut c, &d).await, before);
    check_tree(&d);
    report(
        "kinds and missing keys",
        TRIED.load(Ordering::Relaxed) - start,
    );
});
