#!/usr/bin/env bash
# CPython's regression tests, natively and in a picoprocess, compared module by module
# (issue #11's yardstick; see scripts/conformance.py). Not part of the test command: it
# takes a while. Installs Debian's libpython3.11-testsuite if it is missing, builds the
# release picocenter, and prints a Markdown table. Arguments: test modules to run instead
# of the default list (for example: test_os test_socket).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! dpkg-query -W -f='${Status}' libpython3.11-testsuite 2>/dev/null | grep -q "install ok installed"; then
    echo "conformance: installing libpython3.11-testsuite" >&2
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
        --no-install-recommends libpython3.11-testsuite >/dev/null
fi
cargo build --release --quiet --bin picocenter
exec python3 scripts/conformance.py "$PWD/target/x86_64-unknown-linux-gnu/release/picocenter" "$@"
