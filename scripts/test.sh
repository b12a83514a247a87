#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests on real KVM with real programs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace "$@"
cargo bench --workspace --no-run --quiet
