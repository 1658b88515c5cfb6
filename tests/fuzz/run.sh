#!/usr/bin/env bash
# Fuzzes lamina's layer extractor (tests/fuzz/fuzz_targets/extract.rs) for a bounded time:
# LAMINA_FUZZ_SECONDS (default 120). A crash or an escape from the upper directory fails, and
# libFuzzer leaves the input in tests/fuzz/artifacts/extract/. Needs the nightly toolchain and
# cargo-fuzz (.ci/setup installs both).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${LAMINA_FUZZ_SECONDS:-120}"
mkdir -p tests/fuzz/corpus/extract
cargo +nightly fuzz run extract --fuzz-dir tests/fuzz tests/fuzz/corpus/extract -- \
    -max_total_time="$seconds" -print_final_stats=1
