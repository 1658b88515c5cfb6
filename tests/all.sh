#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks formatting and lints, runs the unit and
# integration tests (as root they mount for real), then containerd's own conformance suite.
set -euo pipefail
cd "$(dirname "$0")/.."

.ci/setup
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo build
cargo test --lib --bins --tests
# The benchmark's smoke mode (every workload at a few operations, to keep it working), by
# name: --all-targets would run it too, whatever Cargo.toml says.
cargo test --bench compare
tests/packaging.sh
tests/conformance/run.sh target/debug/lamina
tests/conformance/run.sh --v2 target/debug/lamina
# The layer extractor against inputs a fuzzer makes up (bounded: LAMINA_FUZZ_SECONDS).
tests/fuzz/run.sh
