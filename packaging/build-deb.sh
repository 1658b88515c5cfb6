#!/usr/bin/env bash
# Builds target/lamina_<version>_<arch>.deb with dpkg-deb: /usr/bin/lamina, both systemd units,
# and /etc/lamina/config.toml as a conffile (an operator's edits survive upgrades).
# A plain script rather than cargo-deb: dpkg-deb is on every Debian machine, nothing to install.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | sed -n 1p)
arch=$(dpkg --print-architecture)
cargo build --release --locked
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -D -m 0755 target/release/lamina "$stage/usr/bin/lamina"
install -D -m 0644 systemd/lamina.service "$stage/lib/systemd/system/lamina.service"
install -D -m 0644 systemd/lamina.socket "$stage/lib/systemd/system/lamina.socket"
install -D -m 0644 packaging/config.toml "$stage/etc/lamina/config.toml"
# What to append to containerd's config.toml, per containerd series, from the packaged config,
# for a node whose kernel can ID-map overlay lowers (5.19+), whatever this machine runs
# (`lamina config containerd` on the node prints it for its own containerd and kernel).
doc="$stage/usr/share/doc/lamina"
mkdir -p "$doc"
for series in 1.6 1.7 2; do
    name="containerd-${series/#2/2.x}"
    target/release/lamina config containerd --config packaging/config.toml \
        --containerd-version "$series" --idmapped-mounts yes > "$doc/$name.toml"
    target/release/lamina config containerd --config packaging/config.toml \
        --containerd-version "$series" --idmapped-mounts yes --cri > "$doc/$name-kubernetes.toml"
done
chmod 0644 "$doc"/*.toml
install -D -m 0644 README.md "$stage/usr/share/doc/lamina/README.md"

# The newest glibc symbol version the binary needs: installing on an older glibc would leave a
# binary that does not start.
glibc=$(objdump -T target/release/lamina | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)

mkdir -p "$stage/DEBIAN"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: lamina
Version: $version
Architecture: $arch
Maintainer: lamina developers <lamina@localhost>
Section: admin
Priority: optional
Depends: libc6 (>= $glibc)
Recommends: containerd
Description: overlayfs snapshotter for containerd
 lamina serves containerd's Snapshots API as a proxy plugin on a unix socket and
 answers with kernel overlayfs mounts, keeping its metadata in a crash-safe store.
CONTROL
echo /etc/lamina/config.toml > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
POSTINST
chmod 0755 "$stage/DEBIAN/postinst"
# Removing the package stops the daemon: left running, it would go on serving from a deleted
# binary. An upgrade leaves it alone (the operator restarts it when ready).
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop lamina.service lamina.socket || true
fi
PRERM
chmod 0755 "$stage/DEBIAN/prerm"

out="target/lamina_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$out" >/dev/null
echo "$out"
