#!/usr/bin/env python3
"""CPython's own regression tests as a conformance suite for the picoprocess.

Runs each module of MODULES with `python3 -m unittest -v test.MODULE` (or some of its test
classes: `MODULE:Class,Class`), natively and in a
picoprocess (`picocenter run`, no --root: the temporary root holds python3 and mounts its
library), each in a scratch working directory, and compares them test by test. Prints a
Markdown table: per module, passed/failed/skipped both ways, how many tests that pass
natively pass in the picoprocess, and the commonest reason for the ones that do not
(the last line of their tracebacks). The total at the end is the figure issue #11 asks
for: of the tests that pass natively, the share that passes in a picoprocess.

Usage: scripts/conformance.py PICOCENTER [MODULE...]   (scripts/conformance.sh wraps it)
"""

import collections
import os
import re
import subprocess
import sys
import tempfile
import time

# Modules that exercise the OS interface: files, I/O, sockets, select, signals, time,
# threads (and subprocess, which needs processes: issue #13).
MODULES = [
    "test_fnmatch", "test_glob", "test_genericpath", "test_posixpath", "test_stat",
    "test_fileio", "test_file", "test_os", "test_posix", "test_shutil", "test_tempfile",
    "test_pathlib", "test_fileinput", "test_filecmp", "test_select", "test_selectors",
    "test_poll", "test_epoll",
    # test_socket as a whole waits forever on this machine's AF_VSOCK, natively too.
    "test_socket:GeneralModuleTests,BasicTCPTest,BasicUDPTest,BasicSocketPairTest,"
    "NonBlockingTCPTests,FileObjectClassTestCase,UnbufferedFileObjectClassTestCase,"
    "NetworkConnectionNoServer,BasicUDPLITETest,TestUnixDomain,TestLinuxAbstractNamespace,"
    "InheritanceTest,SendfileUsingSendTest,ContextManagersTest,TCPTimeoutTest",
    "test_socketserver", "test_signal",
    "test_time", "test_math", "test_json", "test_struct", "test_re", "test_threading",
    "test_thread", "test_queue", "test_fcntl", "test_mmap", "test_errno", "test_resource",
    "test_sched", "test_zlib", "test_gzip", "test_zipfile", "test_csv", "test_hashlib",
    "test_sqlite3.test_dbapi", "test_uuid", "test_timeout", "test_logging", "test_httpservers",
    "test_io", "test_datetime", "test_random", "test_platform",
]

# Per module and way: a hung module is stopped.
TIMEOUT = 300

RESULT = re.compile(r"^(test\w*) \((\S+)\)(?: \.\.\.|\n.*?\.\.\.) (ok|FAIL|ERROR|skipped|expected failure|unexpected success)", re.M)
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
HEADER = re.compile(r"^(?:FAIL|ERROR): (test\w*) \((\S+)\)", re.M)


def run(argv, cwd):
    started = time.monotonic()
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=TIMEOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
        code = done.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        code = "timeout"
    return out, code, time.monotonic() - started


def outcomes(out):
    """test id -> 'pass' | 'fail' | 'skip'."""
    result = {}
    for name, where, verdict in RESULT.findall(out):
        key = f"{where}.{name}" if not where.endswith(name) else where
        result[key] = {"ok": "pass", "expected failure": "pass", "skipped": "skip"}.get(verdict, "fail")
    return result


def reasons(out):
    """test id -> the last line of its traceback."""
    found = {}
    sections = re.split(r"^={50,}$", out, flags=re.M)
    for section in sections:
        header = HEADER.search(section)
        if not header:
            continue
        name, where = header.groups()
        key = f"{where}.{name}" if not where.endswith(name) else where
        # Header, a line of dashes, the traceback, and (for the last) a line of dashes.
        parts = re.split(r"^-{50,}$", section, flags=re.M)
        trace = [l.strip() for l in (parts[1] if len(parts) > 1 else "").splitlines() if l.strip()]
        errors = [l for l in trace if EXCEPTION.match(l)]
        if errors or trace:
            found[key] = (errors or trace)[-1][:110]
    return found


def counts(result):
    c = collections.Counter(result.values())
    return c["pass"], c["fail"], c["skip"]


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    picocenter = sys.argv[1]
    modules = sys.argv[2:] or MODULES
    rows = []
    total_native = total_both = 0
    for entry in modules:
        # MODULE, or MODULE:Class,Class to run only those test classes of it.
        module, _, classes = entry.partition(":")
        names = [f"test.{module}.{c}" for c in classes.split(",")] if classes else [f"test.{module}"]
        with tempfile.TemporaryDirectory(prefix="conformance-") as native_dir, \
                tempfile.TemporaryDirectory(prefix="conformance-data-") as data_dir:
            native_out, native_code, native_s = run(
                ["/usr/bin/python3", "-m", "unittest", "-v", *names], native_dir)
            pico_out, pico_code, pico_s = run(
                [picocenter, "run", "--data-dir", data_dir, "--cwd", "/tmp", "--memory", "512",
                 "--timeout", str(TIMEOUT - 30), "/usr/bin/python3", "-m", "unittest", "-v",
                 *names], native_dir)
        native, pico = outcomes(native_out), outcomes(pico_out)
        passed_native = {t for t, v in native.items() if v == "pass"}
        passed_both = {t for t in passed_native if pico.get(t) == "pass"}
        total_native += len(passed_native)
        total_both += len(passed_both)
        why = reasons(pico_out)
        lost = sorted(passed_native - passed_both)
        common = collections.Counter(why.get(t, "did not run") for t in lost).most_common(2)
        note = "; ".join(f"{n}x {r}" for r, n in common)
        if pico_code == "timeout" or (not pico and pico_code != 0):
            tail = [l for l in pico_out.strip().splitlines() if l.strip()][-1:] or ["no output"]
            note = f"ended ({pico_code}): {tail[0][:110]}; " + note
        share = f"{100 * len(passed_both) / len(passed_native):.0f}%" if passed_native else "-"
        label = f"{module} ({len(names)} classes)" if classes else module
        rows.append((label, counts(native), counts(pico), f"{len(passed_both)}/{len(passed_native)} ({share})",
                     f"{native_s:.0f} s / {pico_s:.0f} s", note))
        print(f"conformance: {label}: {rows[-1][3]}", file=sys.stderr, flush=True)
    print("| module | native passed/failed/skipped | picoprocess passed/failed/skipped "
          "| native passes kept | time native / picoprocess | why the rest differ |")
    print("|---|---|---|---|---|---|")
    for module, n, p, kept, took, note in rows:
        print(f"| {module} | {n[0]}/{n[1]}/{n[2]} | {p[0]}/{p[1]}/{p[2]} | {kept} | {took} | {note} |")
    share = 100 * total_both / total_native if total_native else 0
    print(f"\nOf {total_native} tests that pass natively, {total_both} pass in a picoprocess "
          f"({share:.1f}%).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
