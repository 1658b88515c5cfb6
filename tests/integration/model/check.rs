//! A step run against the daemon, and its answer compared with the model's.

use super::*;

// ---------------------------------------------------------------------------------------------
// Running a step against the daemon
// ---------------------------------------------------------------------------------------------

/// What the daemon answered, reduced to what the model predicts.
#[derive(Debug)]
pub(super) enum Got {
    Mounts(Vec<Mount>),
    Info(Info),
    Usage(i64, i64),
    List(Vec<Info>),
    Unit,
}

fn hmap(labels: &[(String, String)]) -> HashMap<String, String> {
    labels.iter().cloned().collect()
}

pub(super) async fn run_op(c: &mut Client, op: &Op) -> Res<Got> {
    Ok(match op {
        Op::Prepare {
            key,
            parent,
            labels,
        } => Got::Mounts(c.prepare_with(key, parent, hmap(labels)).await?),
        Op::View {
            key,
            parent,
            labels,
        } => Got::Mounts(c.view_with(key, parent, hmap(labels)).await?),
        Op::Mounts { key } => Got::Mounts(c.mounts(key).await?),
        Op::Commit { name, key, labels } => {
            c.commit_with(name, key, hmap(labels)).await?;
            Got::Unit
        }
        Op::Remove { key } => {
            c.remove(key).await?;
            Got::Unit
        }
        Op::Stat { key } => Got::Info(c.stat(key).await?),
        Op::Update { key, labels, paths } => Got::Info(
            c.update_with(Some(info(key, hmap(labels))), paths.clone())
                .await?,
        ),
        Op::Usage { key } => {
            let u = c.usage(key).await?;
            Got::Usage(u.size, u.inodes)
        }
        Op::List { filters, bad } => {
            let mut strings: Vec<String> = filters
                .iter()
                .map(|all| all.iter().map(Sel::render).collect::<Vec<_>>().join(","))
                .collect();
            strings.extend(bad.clone());
            let refs: Vec<&str> = strings.iter().map(String::as_str).collect();
            Got::List(c.list_batches(&refs).await?.0)
        }
        Op::Cleanup => {
            c.cleanup().await?;
            Got::Unit
        }
        Op::Restart => Got::Unit,
    })
}

fn info_matches(info: &Info, name: &str, s: &Snap) -> Result<(), String> {
    let labels: BTreeMap<String, String> = info.labels.clone().into_iter().collect();
    if info.name != name || info.kind != s.kind || info.parent != s.parent || labels != s.labels {
        return Err(format!(
            "daemon: {:?} kind {} parent {:?} labels {labels:?}; model: {name:?} kind {} parent \
             {:?} labels {:?}",
            info.name,
            kind_name(info.kind),
            info.parent,
            kind_name(s.kind),
            s.parent,
            s.labels
        ));
    }
    Ok(())
}

/// Checks the mount shapes containerd's overlay snapshotter returns (a bind without parents,
/// else one overlay, lowers nearest first) and that every directory named is
/// `<root>/snapshots/<decimal>/fs` (keys never become paths).
fn check_mounts(
    mounts: &[Mount],
    kind: i32,
    lowers: &[Option<String>],
    snapshots_dir: &str,
) -> Result<(), String> {
    let fail = |why: &str| {
        Err(format!(
            "{why}: {mounts:?} (kind {}, lowers {lowers:?})",
            kind_name(kind)
        ))
    };
    if mounts.len() != 1 {
        return fail("not exactly one mount");
    }
    let m = &mounts[0];
    let is_fs = |p: &str| is_snapshot_fs(snapshots_dir, p);
    let same_lowers = |got: &[&str]| {
        got.len() == lowers.len()
            && got
                .iter()
                .zip(lowers)
                .all(|(g, want)| is_fs(g) && want.as_deref().is_none_or(|w| w == *g))
    };
    match (kind, lowers.len()) {
        (ACTIVE, 0) | (VIEW, 0) | (VIEW, 1) => {
            let ro = if kind == ACTIVE { "rw" } else { "ro" };
            if m.r#type != "bind" || m.options != [ro, "rbind"] || !is_fs(&m.source) {
                return fail("expected one bind mount of an fs directory");
            }
            if kind == VIEW && lowers.len() == 1 && !same_lowers(&[m.source.as_str()]) {
                return fail("a view of one parent binds the parent's fs");
            }
        }
        _ => {
            if m.r#type != "overlay" || m.source != "overlay" {
                return fail("expected an overlay mount");
            }
            let lowerdir: Vec<&str> = match option(&m.options, "lowerdir") {
                Some(l) => l.split(':').collect(),
                None => return fail("no lowerdir="),
            };
            if !same_lowers(&lowerdir) {
                return fail("lowerdir= is not the chain of parents, nearest first");
            }
            let upper = option(&m.options, "upperdir");
            let work = option(&m.options, "workdir").is_some();
            match kind {
                ACTIVE if !upper.is_some_and(is_fs) || !work => {
                    return fail("an active overlay needs upperdir= and workdir=")
                }
                VIEW if upper.is_some() || work => return fail("a view has no upperdir"),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Compares one answer with the model's prediction; `Ok(fs)` carries the `fs` of a new
/// active snapshot.
pub(super) fn compare(
    want: &Result<Expect, Code>,
    got: &Res<Got>,
    snapshots_dir: &str,
) -> Result<Option<String>, String> {
    match (want, got) {
        (Err(code), Err(status)) if status.code() == *code => {
            if status.message().is_empty() {
                return Err(format!("{code:?} with an empty message"));
            }
            Ok(None)
        }
        (Err(code), Err(status)) => Err(format!(
            "model: {code:?}; daemon: {:?} {:?}",
            status.code(),
            status.message()
        )),
        (Err(code), Ok(got)) => Err(format!("model: {code:?}; daemon: Ok({got:?})")),
        (Ok(want), Err(status)) => Err(format!(
            "model: Ok({want:?}); daemon: {:?} {:?}",
            status.code(),
            status.message()
        )),
        (Ok(want), Ok(got)) => match (want, got) {
            (Expect::Mounts { kind, lowers }, Got::Mounts(m)) => {
                check_mounts(m, *kind, lowers, snapshots_dir)?;
                Ok((*kind == ACTIVE).then(|| own_fs(m).display().to_string()))
            }
            (Expect::Info(name, s), Got::Info(info)) => info_matches(info, name, s).map(|_| None),
            (Expect::Usage(kind), Got::Usage(size, inodes)) => {
                // Nothing is ever written into these snapshots: an active or committed one
                // holds its empty root directory (one inode), a view is zero.
                let ok = match *kind {
                    VIEW => (*size, *inodes) == (0, 0),
                    _ => *inodes == 1 && *size >= 0,
                };
                if ok {
                    Ok(None)
                } else {
                    Err(format!(
                        "usage of a {} snapshot: size {size} inodes {inodes}",
                        kind_name(*kind)
                    ))
                }
            }
            (Expect::List(want), Got::List(got)) => {
                compare_list(want, got)?;
                Ok(None)
            }
            (Expect::Unit, Got::Unit) => Ok(None),
            (want, got) => Err(format!("model: {want:?}; daemon: {got:?}")),
        },
    }
}

pub(super) fn compare_list(want: &[(String, Snap)], got: &[Info]) -> Result<(), String> {
    let mut got: Vec<&Info> = got.iter().collect();
    got.sort_by(|a, b| a.name.cmp(&b.name));
    let got_names: Vec<&str> = got.iter().map(|i| i.name.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    if got_names != want_names {
        return Err(format!("listed {got_names:?}; model: {want_names:?}"));
    }
    for (info, (name, s)) in got.iter().zip(want) {
        info_matches(info, name, s)?;
    }
    Ok(())
}
