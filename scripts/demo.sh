#!/usr/bin/env bash
# The main job on the embedded defaults: real programs, each in its own picoprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
pico=target/release/picocenter
set -x
$pico run --name demo /bin/busybox uname -a
$pico run /bin/busybox sh -c 'echo "hello from a picoprocess: 6*7 = $((6*7))"; exit 3' || echo "exit status $?"
$pico run --trace-syscalls /bin/busybox ls -l /bin/
