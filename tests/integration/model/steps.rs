//! Random steps, biased towards keys that exist so that the interesting answers come often.

use super::*;

// ---------------------------------------------------------------------------------------------
// Generating steps
// ---------------------------------------------------------------------------------------------

fn any_key(rng: &mut Rng) -> String {
    if rng.chance(2) {
        return String::new();
    }
    rng.pick(KEYS).to_string()
}

/// An existing key of one of `kinds` most of the time, else any key.
fn biased_key(rng: &mut Rng, m: &Model, kinds: &[i32], percent: u32) -> String {
    let existing: Vec<String> = m
        .snaps
        .iter()
        .filter(|(_, s)| kinds.contains(&s.kind))
        .map(|(k, _)| k.clone())
        .collect();
    if !existing.is_empty() && rng.chance(percent) {
        rng.pick(&existing).clone()
    } else {
        any_key(rng)
    }
}

fn gen_parent(rng: &mut Rng, m: &Model) -> String {
    match rng.below(100) {
        0..=34 => String::new(),
        35..=79 => {
            let committed = m.committed();
            if committed.is_empty() {
                rng.pick(KEYS).to_string()
            } else {
                rng.pick(&committed).clone()
            }
        }
        _ => rng.pick(KEYS).to_string(),
    }
}

fn gen_labels(rng: &mut Rng) -> Vec<(String, String)> {
    let n = rng.below(3);
    let mut out: Vec<(String, String)> = (0..n)
        .map(|_| {
            (
                rng.pick(LABEL_KEYS).to_string(),
                rng.pick(LABEL_VALUES).to_string(),
            )
        })
        .collect();
    // A map cannot hold one key twice: keep the last.
    let mut seen = std::collections::HashSet::new();
    out.reverse();
    out.retain(|(k, _)| seen.insert(k.clone()));
    out.reverse();
    if rng.chance(2) {
        out.push((String::new(), "x".into()));
    }
    out
}

fn gen_sel(rng: &mut Rng, m: &Model) -> Sel {
    let field = match rng.below(4) {
        0 => Field::Name,
        1 => Field::Parent,
        2 => Field::Kind,
        _ => Field::Label(rng.pick(LABEL_KEYS).to_string()),
    };
    let value = |rng: &mut Rng| -> String {
        match &field {
            Field::Kind => rng.pick(&["active", "view", "committed", "x"]).to_string(),
            Field::Label(_) => rng.pick(LABEL_VALUES).to_string(),
            Field::Name | Field::Parent => {
                if rng.chance(20) {
                    String::new()
                } else if !m.snaps.is_empty() && rng.chance(60) {
                    let keys: Vec<&String> = m.snaps.keys().collect();
                    rng.pick(&keys).to_string()
                } else {
                    rng.pick(KEYS).to_string()
                }
            }
        }
    };
    let op = match rng.below(10) {
        0..=1 => FOp::Present,
        2..=5 => FOp::Eq(value(rng)),
        6..=7 => FOp::Ne(value(rng)),
        _ => {
            let v = value(rng);
            let cut = rng.below(v.chars().count() + 1);
            FOp::Prefix(v.chars().take(cut).collect())
        }
    };
    // Unquoted label keys only where the grammar allows them.
    let bare = match &field {
        Field::Label(k) => {
            k.split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                && rng.chance(50)
        }
        _ => rng.chance(50),
    };
    Sel { field, op, bare }
}

pub(super) fn gen_op(rng: &mut Rng, m: &Model) -> Op {
    match rng.below(1000) {
        0..=179 => Op::Prepare {
            key: any_key(rng),
            parent: gen_parent(rng, m),
            labels: gen_labels(rng),
        },
        180..=249 => Op::View {
            key: any_key(rng),
            parent: gen_parent(rng, m),
            labels: gen_labels(rng),
        },
        250..=309 => Op::Mounts {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
        },
        310..=459 => Op::Commit {
            name: any_key(rng),
            key: biased_key(rng, m, &[ACTIVE], 70),
            labels: gen_labels(rng),
        },
        460..=559 => Op::Remove {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 70),
        },
        560..=629 => Op::Stat {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 70),
        },
        630..=719 => {
            let paths = match rng.below(10) {
                0 => None,
                1 => Some(vec![]),
                2 => Some(vec!["labels".into()]),
                3..=6 => Some(
                    (0..1 + rng.below(2))
                        .map(|_| format!("labels.{}", rng.pick(LABEL_KEYS)))
                        .collect(),
                ),
                7 => Some(vec![rng
                    .pick(&["parent", "name", "kind", "created_at", "Labels"])
                    .to_string()]),
                _ => Some(vec![
                    format!("labels.{}", rng.pick(LABEL_KEYS)),
                    rng.pick(&["parent", "kind"]).to_string(),
                ]),
            };
            Op::Update {
                key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
                labels: gen_labels(rng),
                paths,
            }
        }
        720..=769 => Op::Usage {
            key: biased_key(rng, m, &[ACTIVE, VIEW, COMMITTED], 80),
        },
        770..=949 => {
            let n = rng.below(3);
            let filters = (0..n)
                .map(|_| (0..1 + rng.below(2)).map(|_| gen_sel(rng, m)).collect())
                .collect();
            let bad = rng.chance(5).then(|| {
                rng.pick(&["name==", "==a", "kind=view", "name~=\"(\"", "labels."])
                    .to_string()
            });
            Op::List { filters, bad }
        }
        950..=979 => Op::Cleanup,
        _ => Op::Restart,
    }
}
