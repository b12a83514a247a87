#!/usr/bin/env python3
"""Where a `picocenter run` start-up goes, phase by phase, for one or more builds side by
side (issue #15's breakdown of a static hello, before and after).

Each run is `BINARY run PROGRAM` with RUST_LOG=trace; the phases are cut at the VMM's own
log lines (their timestamps), and at this script's clock around the run (which adds the
cost of Python's fork and exec, ~0.3 ms). Runs alternate between the builds; medians.
A build that lacks a log line (an older one) shows its phases merged.

    python3 benches/startup_phases.py [--runs N] PROGRAM BINARY [BINARY...]

For example, this build against another:

    python3 benches/startup_phases.py target/x86_64-unknown-linux-gnu/tmp/guests/hello-static \\
        target/x86_64-unknown-linux-gnu/release/picocenter /path/to/before/picocenter
"""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import time

# (what the log line contains, the phase's end it marks)
MARKS = [
    ("run: arguments parsed", "parsed"),
    ("run: root ready", "root ready"),
    ("jail: uid leased", "uid leased"),
    ("in the jail", "jailed"),
    ("picoprocess built", "built"),
    ("DEBUG running ", "running"),
    (" ended ", "ended"),
]


def stamp(line):
    text = line.split()[0][:26]
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def one_run(binary, program):
    env = dict(os.environ, RUST_LOG="trace")
    started = time.time()
    out = subprocess.run([binary, "run", program], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env, text=True, check=True)
    ended = time.time()
    seen = {}
    # An older build colours its log even into a pipe.
    for line in re.sub(r"\x1b\[[0-9;]*m", "", out.stderr).splitlines():
        for needle, name in MARKS:
            if needle in line and name not in seen:
                seen[name] = stamp(line)
    points = [("start", started)] + [(n, seen[n]) for _, n in MARKS if n in seen]
    points.append(("exit", ended))
    phases = {f"{a} -> {b}": (tb - ta) * 1e3 for (a, ta), (b, tb) in zip(points, points[1:])}
    phases["total"] = (ended - started) * 1e3
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("program")
    parser.add_argument("binaries", nargs="+")
    args = parser.parse_args()
    runs = {b: [] for b in args.binaries}
    for _ in range(args.runs):
        for binary in args.binaries:
            runs[binary].append(one_run(binary, args.program))
    for binary, results in runs.items():
        print(f"{binary} (medians of {args.runs} runs):")
        for phase in results[0]:
            values = [r[phase] for r in results if phase in r]
            print(f"  {phase:<28} {statistics.median(values):6.2f} ms")


if __name__ == "__main__":
    main()
