#!/usr/bin/env bash
# The main job on the embedded defaults: `picocenter demo`, a hub and a worker in one
# process with the sample apps registered (counter, nginx, python, lighttpd). A short tour
# queries counter.pico.local, talks to it, waits for it to swap out when idle, and brings
# it back with another query. On a terminal the demo then keeps running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
pico="$PWD/target/x86_64-unknown-linux-gnu/release/picocenter"
export PICOCENTER_STATE_DIR="${PICOCENTER_STATE_DIR:-$PWD/target/demo-state}"
idle=5
dns=(@127.0.0.1 -p 5353 +short)

"$pico" demo --idle-after "$idle" &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null' EXIT
for _ in $(seq 1 600); do
    "$pico" app ls >/dev/null 2>&1 && break
    sleep 0.2
done

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
address=$(dig "${dns[@]}" counter.pico.local)
step dig "${dns[@]}" counter.pico.local
step curl -s "http://$address/"
step curl -s "http://$address/"
echo; echo "(waiting $((idle + 2)) s: counter is idle and swaps out to cold storage)"
sleep $((idle + 2))
step "$pico" app ls
step dig "${dns[@]}" counter.pico.local
address=$(dig "${dns[@]}" counter.pico.local)
step curl -s "http://$address/"
step "$pico" app status counter

if [ -t 0 ]; then
    echo; echo "The demo keeps running: try nginx.pico.local, python.pico.local, lighttpd.pico.local. Ctrl-C stops."
    wait $demo
fi
