//! Model-based test: random sequences of all ten RPCs run against the real daemon and against a
//! small in-memory model of what containerd expects of a snapshotter (the RPCs' rules for kinds,
//! parents and labels, their error codes, mount shapes and List's filters, as containerd's own
//! overlay snapshotter and its conformance suite have them), compared after every step. The daemon is restarted now and then in the
//! middle of a sequence, and must still agree with the model afterwards (persistence).
//!
//! Deterministic: a fixed seed and a fixed budget in CI. `LAMINA_MODEL_CASES` (sequences),
//! `LAMINA_MODEL_STEPS` (steps per sequence) and `LAMINA_MODEL_SEED` (base seed) change them; a
//! failure prints the seed of its sequence and every step up to the one that disagreed.
//!
//! `rules`: the model; `steps`: generating random steps from it; `check`: running a step
//! against the daemon and comparing the answer with the model's.

mod check;
mod rules;
mod steps;

use std::collections::{BTreeMap, HashMap};

use tonic::Code;

use crate::util::*;
use check::*;
use rules::*;
use steps::*;

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    sequences: u64,
    steps: u64,
    restarts: u64,
    errors: u64,
}

/// Runs one sequence of `steps` random steps from `seed` on a fresh daemon.
async fn run_sequence(seed: u64, steps: u64, sync_remove: bool, totals: &mut Totals) {
    let config = if sync_remove {
        "sync_remove = true\n"
    } else {
        ""
    };
    let mut d = TestDaemon::start_with_config(config).await;
    let mut c = d.client().await;
    let snapshots_dir = d.root.join("snapshots").display().to_string();
    let mut rng = Rng::new(seed);
    let mut model = Model::default();
    let mut trace: Vec<String> = Vec::new();
    // Serving (not merely listening) before the first step, which may be a restart.
    assert_eq!(c.list(&[]).await.unwrap(), Vec::<String>::new());

    for step in 0..steps {
        let op = gen_op(&mut rng, &model);
        let want = model.apply(&op);
        let got = if let Op::Restart = op {
            drop(c);
            d.restart().await;
            c = d.client().await;
            totals.restarts += 1;
            Ok(Got::Unit)
        } else {
            run_op(&mut c, &op).await
        };
        if got.is_err() {
            totals.errors += 1;
        }
        trace.push(format!(
            "{step:3}: {op:?} -> {}",
            match &got {
                Ok(_) => "Ok".to_string(),
                Err(s) => format!("{:?} {:?}", s.code(), s.message()),
            }
        ));
        let fail = |why: String, trace: &[String]| -> ! {
            panic!(
                "sequence seed {seed:#x} (sync_remove {sync_remove}) disagrees with the model at \
                 step {step}: {why}\n{}",
                trace.join("\n")
            )
        };
        match compare(&want, &got, &snapshots_dir) {
            Ok(Some(fs)) => {
                if let Op::Prepare { key, .. } = &op {
                    model.snaps.get_mut(key).unwrap().fs = Some(fs);
                }
            }
            Ok(None) => {}
            Err(why) => fail(why, &trace),
        }
        // After every step: the whole store as the daemon lists it is the model.
        let all = match c.list_batches(&[]).await {
            Ok((all, _)) => all,
            Err(s) => fail(format!("List failed: {s:?}"), &trace),
        };
        let want: Vec<(String, Snap)> = model
            .snaps
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        if let Err(why) = compare_list(&want, &all) {
            fail(format!("after the step, {why}"), &trace);
        }
        // Directories: only decimal names; one per snapshot once nothing is pending removal.
        // After a restart, what the stopped lamina had still queued for deletion is found by
        // start-up recovery and deleted in the background: wait for it (a Cleanup would too).
        let dirs = if matches!(op, Op::Restart) {
            let n = model.snaps.len();
            d.snapshot_dirs_when(std::time::Duration::from_secs(10), |dirs| dirs.len() <= n)
                .await
        } else {
            d.snapshot_dirs()
        };
        if !dirs.iter().all(|d| is_decimal(d)) {
            fail(
                format!("non-decimal names under snapshots/: {dirs:?}"),
                &trace,
            );
        }
        let settled = sync_remove || matches!(op, Op::Cleanup | Op::Restart);
        if settled && dirs.len() != model.snaps.len() {
            fail(
                format!(
                    "{} directories under snapshots/ for {} snapshots: {dirs:?}",
                    dirs.len(),
                    model.snaps.len()
                ),
                &trace,
            );
        }
        if dirs.len() < model.snaps.len() {
            fail(
                format!("fewer directories than snapshots: {dirs:?}"),
                &trace,
            );
        }
        totals.steps += 1;
    }
    drop(c);
    let status = d.stop_async().await;
    assert!(status.success(), "lamina exited with {status}");
    totals.sequences += 1;
}

root_test!(random_sequences_agree_with_the_model, || {
    let cases = env_or("LAMINA_MODEL_CASES", 32);
    let steps = env_or("LAMINA_MODEL_STEPS", 60);
    let seed = env_or("LAMINA_MODEL_SEED", 0x1a31_7a00_5eed);
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for i in 0..cases {
        let seq_seed = Rng::new(seed ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d)).next_u64();
        run_sequence(seq_seed, steps, i % 4 == 3, &mut totals).await;
    }
    eprintln!(
        "model: {} sequences x {steps} steps = {} steps ({} answered an error), {} restarts, \
         base seed {seed:#x}, {:.1?}",
        totals.sequences,
        totals.steps,
        totals.errors,
        totals.restarts,
        started.elapsed()
    );
});
