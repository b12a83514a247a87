#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests on real KVM with real programs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace "$@"
# The benchmarks must keep compiling; built with the test profile, beside the tests.
cargo test --workspace --benches --no-run --quiet
