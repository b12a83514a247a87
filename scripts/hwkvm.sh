#!/usr/bin/env bash
# The hardware-KVM smoke suite on its own (it also runs in `cargo test --workspace`): boots
# a Debian cloud kernel under QEMU TCG with an emulated AMD SVM CPU, loads kvm_amd, and
# runs picoprocesses there (tests/hwkvm.rs, tests/hwkvm/). Prints the per-check lines.
#
#   scripts/hwkvm.sh             test the debug picocenter that `cargo test` builds
#   scripts/hwkvm.sh --release   test the release picocenter (both are static: see
#                                .cargo/config.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
target=${CARGO_TARGET_DIR:-target}
case "${1:-}" in
    --release)
        cargo build --release -p picocenter --bin picocenter
        PICOCENTER_HWKVM_VMM="$(realpath "$target/x86_64-unknown-linux-gnu/release/picocenter")"
        export PICOCENTER_HWKVM_VMM
        ;;
    "") ;;
    *)
        echo "usage: $0 [--release]" >&2
        exit 2
        ;;
esac
exec cargo test --test hwkvm -- --nocapture
