#!/usr/bin/env bash
# The user level of the benchmark (`compare --only-containerd`) on each storage setup a user may
# have, one after the other, plus the full run on the machine's own root filesystem:
#
#   ram-ext4   ext4 in a loop file on /dev/shm: RAM-backed, so the disk's noise is out and
#              what is left is CPU work, the two snapshotters' own difference
#   ram-ext4-nojournal
#              the same without a journal, like this VM's root: ext4 then avoids reusing
#              inodes deleted in the last minute (six while their inode table block is dirty),
#              which makes creating files after a large deletion CPU work
#   disk-ext4  ext4 with its journal (mkfs's default) in a loop file on the disk
#   disk-xfs   xfs in a loop file on the disk
#   root       the machine's own root filesystem (here: ext4 without a journal, discard), with
#              the whole benchmark (snapshotter level, latency curve, start-up at scale)
#
# What durable_commit costs runs on ram-ext4 (where its target is) and root; the two disk
# setups leave it out (it doubles their run time).
#
# Each writes <out>/<setup>.md (the tables) and <out>/<setup>.jsonl (every sample, for
# benches/plot.py), and <out>/<setup>.log (progress). As root.
#
#   benches/setups.sh [OUT_DIR] [SETUP...]     default: target/lamina-bench/results, all four
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/lamina-bench/results}"
shift || true
setups=("$@")
[ "${#setups[@]}" -gt 0 ] || setups=(ram-ext4 disk-ext4 disk-xfs root)
mkdir -p "$out"
# Built first, so that no compilation runs during a measurement.
cargo bench --bench compare --no-run

mnt=/mnt/lamina-bench
dev=""
cleanup() {
    # Recursively: a container's rootfs or a snapshot mount left under it must not keep the
    # filesystem (and a RAM-backed image) alive under the next setup.
    if mountpoint -q "$mnt"; then
        umount -R "$mnt" || { echo "setups: cannot unmount $mnt" >&2; exit 1; }
    fi
    [ -z "$dev" ] || losetup -d "$dev" || { echo "setups: cannot detach $dev" >&2; exit 1; }
    dev=""
    rm -f /dev/shm/lamina-bench.img /var/tmp/lamina-bench.img
}
trap cleanup EXIT

for setup in "${setups[@]}"; do
    args=(--only-containerd --dir "$mnt")
    # On the disk, the loop device reads and writes its file with direct I/O, so that the
    # filesystem meets the disk (its flushes included) rather than a second page cache; a
    # file on /dev/shm cannot (tmpfs has no direct I/O), and is RAM anyway.
    case "$setup" in
        ram-ext4) img=/dev/shm/lamina-bench.img; mkfs=(mkfs.ext4 -q -F); dio=off ;;
        ram-ext4-nojournal) img=/dev/shm/lamina-bench.img; mkfs=(mkfs.ext4 -q -F -O ^has_journal)
            dio=off; args+=(--no-durable) ;;
        disk-ext4) img=/var/tmp/lamina-bench.img; mkfs=(mkfs.ext4 -q -F); dio=on
            args+=(--no-durable) ;;
        disk-xfs) img=/var/tmp/lamina-bench.img; mkfs=(mkfs.xfs -q -f); dio=on
            args+=(--no-durable) ;;
        root) img=""; args=(--dir /var/tmp) ;;
        *) echo "unknown setup $setup (ram-ext4, ram-ext4-nojournal, disk-ext4, disk-xfs, root)" >&2
            exit 2 ;;
    esac
    if [ -n "$img" ]; then
        cleanup
        truncate -s 16G "$img"
        dev="$(losetup -f --show --direct-io="$dio" "$img")"
        "${mkfs[@]}" "$dev"
        mkdir -p "$mnt"
        mount "$dev" "$mnt"
    fi
    sync
    echo "== $setup: $(date -u +%FT%TZ)" >&2
    cargo bench --bench compare -- "${args[@]}" --json "$out/$setup.jsonl" \
        >"$out/$setup.md" 2>"$out/$setup.log"
    [ -z "$img" ] || cleanup
done
