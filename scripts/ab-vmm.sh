#!/usr/bin/env bash
# A/B of single-threaded figures between two `picocenter` binaries (say, a release build
# of an older commit in its own worktree and target directory, and this one's): getppid
# through the mailbox and by exit, a static hello's start-up, and nginx under wrk, in
# alternating rounds (ROUNDS, default 9), medians. BENCHMARKS.md, "A vCPU per thread".
# Usage: scripts/ab-vmm.sh OLD NEW. Needs the test guests and the nginx image, which
# `cargo test --test servers --test picoprocess` builds.
set -u
OLD=$(realpath "$1"); NEW=$(realpath "$2")
cd "$(dirname "$0")/.."
G=$PWD/target/x86_64-unknown-linux-gnu/tmp/guests
export PICOCENTER_STATE_DIR=$PWD/target/x86_64-unknown-linux-gnu/tmp/state
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
R=${ROUNDS:-9}
declare -A S
for r in $(seq $R); do
  for w in old new; do
    b=$OLD; [ $w = new ] && b=$NEW
    S[mb_$w]+="$($b run $G/syscall_bench-static getppid 200000) "
    S[ex_$w]+="$($b run --no-mailbox $G/syscall_bench-static getppid 20000) "
    t0=$(date +%s%N); $b run $G/hello-static > /dev/null; t1=$(date +%s%N)
    S[hello_$w]+="$(( (t1 - t0) / 1000 )) "
  done
done
for k in mb ex hello; do
  o=$(echo ${S[${k}_old]} | tr ' ' '\n' | median); n=$(echo ${S[${k}_new]} | tr ' ' '\n' | median)
  echo "$k old $o new $n ratio $(echo "scale=3; $n / $o" | bc)"
done
# nginx: both at once, wrk alternating
$OLD run --name ab-old --address 127.0.15.1 --image nginx > /tmp/ab-old.log 2>&1 &
$NEW run --name ab-new --address 127.0.15.2 --image nginx > /tmp/ab-new.log 2>&1 &
sleep 3
for r in $(seq 5); do
  for w in old new; do
    ip=127.0.15.1; [ $w = new ] && ip=127.0.15.2
    S[ng_$w]+="$(wrk -t1 -c10 -d3 http://$ip/ 2>/dev/null | awk '/Requests\/sec/ {print $2}') "
  done
done
$OLD stop ab-old > /dev/null 2>&1; $NEW stop ab-new > /dev/null 2>&1
o=$(echo ${S[ng_old]} | tr ' ' '\n' | median); n=$(echo ${S[ng_new]} | tr ' ' '\n' | median)
echo "nginx old $o new $n ratio $(echo "scale=3; $n / $o" | bc)"
