#!/usr/bin/env bash
# Run containerd's snapshotter conformance suite against a lamina binary.
#
# Usage: tests/conformance/run.sh [--v2] [LAMINA_BIN] [extra go test args...]
#   e.g. tests/conformance/run.sh target/debug/lamina
#        tests/conformance/run.sh --v2 target/debug/lamina   # containerd 2.x's suite
#        tests/conformance/run.sh target/debug/lamina -run 'TestLaminaConformance/^(Basic|Walk)$'
#        tests/conformance/run.sh --self-test   # harness check: runs the suite
#            against containerd's own overlayfs snapshotter (the benchmark's
#            benches/go/src/laminabench/overlayd)
#
# The lamina binary comes from $1 or, if $1 is absent/empty, from $LAMINA_BIN.
# Must run as root (the suite mounts filesystems).
#
# Environment:
#   LAMINA_BIN            lamina binary (if $1 is not given)
#   CONFORMANCE_TIMEOUT   go test -timeout value (default 30m)
#   CONFORMANCE_LOG       if set, a copy of the full output is written there
#   GOCACHE               Go build cache (default: a temp dir, removed on exit)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# --v2: containerd 2.x's suite (core/snapshots/testsuite), a Go module (v2/) at the
# long-term release of .ci/versions, fetched through the Go module proxy. Without it:
# containerd 1.6's suite, built offline from Debian's packaged sources.
v2=0
if [[ "${1:-}" == "--v2" ]]; then
    v2=1
    shift
fi

self_test=0
if [[ "${1:-}" == "--self-test" ]]; then
    self_test=1
    shift
    bin=""
else
    bin="${1:-${LAMINA_BIN:-}}"
    if [[ $# -gt 0 ]]; then shift; fi
fi
if [[ $self_test -eq 0 && -z "$bin" ]]; then
    echo "usage: $0 <path/to/lamina> [go test args...]   (or set LAMINA_BIN)" >&2
    exit 2
fi
if [[ $self_test -eq 0 ]]; then
    if [[ ! -f "$bin" || ! -x "$bin" ]]; then
        echo "conformance: lamina binary '$bin' does not exist or is not executable" >&2
        exit 2
    fi
    LAMINA_BIN="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
    export LAMINA_BIN
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "conformance: must run as root (the suite mounts overlay filesystems)" >&2
    exit 2
fi

GO="${GO:-go}"
if ! command -v "$GO" >/dev/null 2>&1; then
    echo "conformance: '$GO' not found; install the packages in tests/conformance/debian-packages.txt" >&2
    exit 2
fi

# Scratch dir: the suite's per-case temp dirs (and lamina's roots/sockets) go
# here via TMPDIR, so anything left mounted can be cleaned up on exit. Keep
# it short: unix socket paths are limited to 108 bytes.
work="$(mktemp -d /tmp/lamina-conf.XXXXXX)"
cleanup() {
    # Lazily unmount anything still mounted under the scratch dir, deepest first.
    if [[ -r /proc/self/mountinfo ]]; then
        awk -v p="$work/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
    fi
    rm -rf --one-file-system "$work" 2>/dev/null || true
}
trap cleanup EXIT

if [[ $v2 -eq 1 ]]; then
    if [[ $self_test -eq 1 ]]; then
        echo "conformance: --self-test runs the 1.6 suite only" >&2
        exit 2
    fi
    # The suite's containerd is the one .ci/versions pins first (the long-term release).
    # shellcheck source=../../.ci/versions
    . "$script_dir/../../.ci/versions"
    want="${CONTAINERD_VERSIONS%% *}"
    have="$(awk '$1 == "github.com/containerd/containerd/v2" { print $2 }' "$script_dir/v2/go.mod")"
    if [[ "$have" != "$want" ]]; then
        echo "conformance: v2/go.mod requires containerd $have but .ci/versions pins $want;" \
            "run: (cd tests/conformance/v2 && go get github.com/containerd/containerd/v2@$want && go mod tidy)" >&2
        exit 2
    fi
    # Debian's /usr/bin/go is too old for containerd 2.x's module.
    if [[ "$GO" == go && -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    fi
    # The module's build is kept between runs (Go's own cache), unlike the 1.6 one's.
    export GOCACHE="${GOCACHE:-$("$GO" env GOCACHE)}"
    export GO111MODULE=on
    export GOFLAGS=-mod=readonly
    cd "$script_dir/v2"
    pkg="."
else
    # Hermetic, offline GOPATH-mode build against Debian's packaged Go sources.
    export GO111MODULE=off
    # benches/go holds overlayd, which --self-test builds.
    export GOPATH="$script_dir:$script_dir/../../benches/go:/usr/share/gocode"
    export GOFLAGS=""
    export GOPROXY=off
    export GOSUMDB=off
    pkg="lamina/conformance"
fi
export CGO_ENABLED="${CGO_ENABLED:-0}"
if [[ -z "${GOCACHE:-}" ]]; then
    export GOCACHE="$work/gocache"
fi
if [[ -z "${HOME:-}" ]]; then
    export HOME="$work/home"
    mkdir -p "$HOME"
fi
export TMPDIR="$work"

timeout="${CONFORMANCE_TIMEOUT:-30m}"
log="$work/go-test.log"

echo "conformance: $("$GO" version)"
if [[ $self_test -eq 1 ]]; then
    echo "conformance: self-test: building laminabench/overlayd (containerd's overlayfs snapshotter behind the Snapshots API)"
    "$GO" build -o "$work/overlayd" laminabench/overlayd
    LAMINA_BIN="$work/overlayd"
    export LAMINA_BIN
fi
echo "conformance: lamina binary: $LAMINA_BIN"
echo "conformance: building $pkg ($([[ $v2 -eq 1 ]] && echo "containerd $want's suite, module mode" || echo "containerd 1.6's suite, GOPATH=$GOPATH"))"
if ! "$GO" vet "$pkg"; then
    echo "conformance: RESULT: FAIL (harness does not build; missing Debian golang-*-dev packages?)"
    exit 1
fi

echo "conformance: running: go test -v -count=1 -timeout $timeout $pkg $*"
set +e
"$GO" test -v -count=1 -timeout "$timeout" "$pkg" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

if [[ -n "${CONFORMANCE_LOG:-}" ]]; then
    cp "$log" "$CONFORMANCE_LOG" || true
fi

# Per-case summary from go test -v's result lines.
case_re='^[[:space:]]*--- (PASS|FAIL|SKIP): TestLaminaConformance/([^/[:space:]]+) '
pass=0 fail=0 skip=0 failed=()
while IFS= read -r line; do
    if [[ "$line" =~ $case_re ]]; then
        case "${BASH_REMATCH[1]}" in
            PASS) pass=$((pass + 1)) ;;
            FAIL) fail=$((fail + 1)); failed+=("${BASH_REMATCH[2]}") ;;
            SKIP) skip=$((skip + 1)) ;;
        esac
    fi
done <"$log"
total=$((pass + fail + skip))

echo
echo "conformance: ==================== summary ===================="
for name in "${failed[@]+"${failed[@]}"}"; do
    echo "conformance:   FAIL $name"
done
if grep -q '^panic: test timed out' "$log"; then
    echo "conformance:   go test timed out after $timeout (some cases never finished)"
fi
if [[ $rc -eq 0 && $fail -eq 0 && $total -gt 0 ]]; then
    echo "conformance: RESULT: PASS ($pass passed, $fail failed, $skip skipped of $total cases)"
    exit 0
fi
echo "conformance: RESULT: FAIL ($pass passed, $fail failed, $skip skipped of $total cases; go test exit $rc)"
[[ $rc -ne 0 ]] && exit "$rc"
exit 1
