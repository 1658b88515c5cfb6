#!/usr/bin/env bash
# Builds the .deb, checks its file list, conffiles, Depends and prerm, installs it, verifies both systemd units
# with systemd-analyze against the installed binary, checks `lamina config default` against the
# packaged file, then removes the package again.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=$(packaging/build-deb.sh)
files=$(dpkg-deb -c "$deb" | awk '{print $6}' | grep -v '/$' | sort)
expected=$(printf '%s\n' \
    ./etc/lamina/config.toml \
    ./lib/systemd/system/lamina.service \
    ./lib/systemd/system/lamina.socket \
    ./usr/bin/lamina \
    ./usr/share/doc/lamina/README.md \
    ./usr/share/doc/lamina/containerd-1.6.toml \
    ./usr/share/doc/lamina/containerd-1.6-kubernetes.toml \
    ./usr/share/doc/lamina/containerd-1.7.toml \
    ./usr/share/doc/lamina/containerd-1.7-kubernetes.toml \
    ./usr/share/doc/lamina/containerd-2.x.toml \
    ./usr/share/doc/lamina/containerd-2.x-kubernetes.toml | sort)
if [ "$files" != "$expected" ]; then
    echo "packaging: unexpected file list in $deb:"; echo "$files"; exit 1
fi
[ "$(dpkg-deb -I "$deb" conffiles)" = /etc/lamina/config.toml ] || { echo "packaging: conffiles wrong"; exit 1; }

case "$(dpkg-deb -f "$deb" Depends)" in
    "libc6 (>= 2."*) ;;
    *) echo "packaging: Depends must name the glibc the binary needs: $(dpkg-deb -f "$deb" Depends)"; exit 1 ;;
esac
dpkg-deb -I "$deb" prerm | grep 'systemctl stop lamina.service lamina.socket' >/dev/null \
    || { echo "packaging: prerm does not stop the daemon"; exit 1; }

dpkg -i "$deb" >/dev/null
trap 'dpkg --purge lamina >/dev/null' EXIT
systemd-analyze verify /lib/systemd/system/lamina.service /lib/systemd/system/lamina.socket
diff <(lamina config default) /etc/lamina/config.toml
lamina config dump --config /etc/lamina/config.toml >/dev/null
# Without --config, lamina reads the installed file: a changed key shows in what it resolves.
sed -i 's/^upperdir_label = false$/upperdir_label = true/' /etc/lamina/config.toml
lamina config dump | grep -x 'upperdir_label = true' >/dev/null \
    || { echo "packaging: lamina does not read /etc/lamina/config.toml by default"; exit 1; }
# The shipped containerd fragments are what the installed lamina prints for its config.
for series in 1.6 1.7 2; do
    name="containerd-${series/#2/2.x}"
    diff <(lamina config containerd --config /etc/lamina/config.toml --containerd-version "$series" \
        --idmapped-mounts yes --cri) \
        "/usr/share/doc/lamina/$name-kubernetes.toml"
done
echo "packaging: 1 passed, 0 failed"
