//! durable_commit's cost: lamina against itself, with the setting on and off.

use std::{path::Path, time::Duration};

use crate::{
    pair::{alternate, chunk},
    report,
    server::{Bins, Kind, Server},
    stage, sync_disks, workloads, Sizes,
};

/// lamina's config with durable_commit on, then off, and the label of each.
pub const DURABLE: [(&str, &str); 2] = [
    ("durable_commit = true\n", "on"),
    ("durable_commit = false\n", "off"),
];

/// What durable_commit costs Commit, on two lamina servers, one with durable_commit on and one
/// with it off, in rounds that [`alternate`] between them: a freshly written layer of `s.files`
/// files (not synced, as containerd's applier leaves it), and empty layers (the sync's fixed
/// cost), from one client and from `s.clients`.
pub async fn run(base: &Path, bins: &Bins, s: &Sizes) -> Vec<report::OnOff> {
    /// One of the two servers, and its samples: one per round.
    struct Side {
        server: Server,
        commit: Vec<Duration>,
        serial: Vec<Duration>,
        concurrent: Vec<Duration>,
        live: Vec<String>,
    }
    let mut sides = DURABLE.map(|(config, label)| {
        let dir = base.join(format!("durable-{label}"));
        let mut server = Server::start_with(Kind::Lamina, bins, &dir, config);
        server.target.label = format!("lamina (durable_commit {label})");
        Side {
            server,
            commit: Vec::new(),
            serial: Vec::new(),
            concurrent: Vec::new(),
            live: Vec::new(),
        }
    });
    stage(&format!(
        "durable_commit on and off: Commit of a freshly written layer of {} files, {} serial \
         pairs, {} pairs from {} clients (in {} rounds)",
        s.files, s.serial, s.concurrent, s.clients, s.durable_reps
    ));
    let reps = s.durable_reps;
    alternate(0..reps, sides.each_mut(), async |r, side| {
        let t = &side.server.target;
        // What the previous round left dirty is written out first, untimed; this round's
        // files stay dirty until its Commit.
        sync_disks();
        let took = workloads::big_commit(t, "fresh", r, s.files, false, &mut side.live).await;
        side.commit.push(took);
        // Per pair, so that each round is one sample; after the layer above is on disk,
        // so that neither server's pairs meet its writeback.
        sync_disks();
        let range = chunk(s.serial, reps, r);
        let n = range.len() as u32;
        let (wall, _) = workloads::serial_pairs(t, "dserial", range, 10, "", &mut side.live).await;
        side.serial.push(wall / n);
        let range = chunk(s.concurrent, reps, r);
        let n = range.len() as u32;
        let wall =
            workloads::concurrent_pairs(t, "dconc", range, s.clients, 10, &mut side.live).await;
        side.concurrent.push(wall / n);
    })
    .await;
    for side in &mut sides {
        side.server.stop();
    }
    let [on, off] = sides;
    vec![
        report::OnOff {
            workload: format!(
                "Commit of a freshly written (unsynced) layer of {} files",
                s.files
            ),
            on: on.commit,
            off: off.commit,
        },
        report::OnOff {
            workload: format!(
                "serial prepare+commit pair, empty layers (wall time per pair; {} in all)",
                s.serial
            ),
            on: on.serial,
            off: off.serial,
        },
        report::OnOff {
            workload: format!(
                "prepare+commit pairs from {} clients, empty layers (wall time per pair; {} in all)",
                s.clients, s.concurrent
            ),
            on: on.concurrent,
            off: off.concurrent,
        },
    ]
}
