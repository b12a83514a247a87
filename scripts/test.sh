#!/usr/bin/env bash
# The whole test suite: formatting and lints, unit tests, and end-to-end tests on real KVM
# with real programs. Every test binary runs (--no-fail-fast), and cargo lists each one that
# failed at the end. Extra arguments go to `cargo test` (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The apps the tests run keep their own snapshots in the tests' state directory
# (<state>/snapshots/NAME, beside the copies the tests ask for with -o). A run starts
# without the last run's, which would otherwise add up: half a GiB per run for one test.
rm -rf "${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/tmp/state/snapshots"
cargo test --workspace --no-fail-fast "$@"
# The benchmarks must keep compiling; built with the test profile, beside the tests.
cargo test --workspace --benches --no-run --quiet
