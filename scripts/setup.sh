#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently: Debian packages for the real apps
# under test and for the tests' own tools, and the S3 test server. Quick when everything is
# already there, and safe to run beside another apt user (it waits for dpkg's lock).
set -euo pipefail
cd "$(dirname "$0")/.."

# The tests' tools, and every package an image under images/ names (its `apt = [...]`), so
# that no test installs anything while the suite runs.
# (systemd: its systemd-analyze checks the unit files in deploy/systemd.)
# (protobuf-compiler and libprotobuf-dev: etcd-client's build needs protoc and the
# well-known types. etcd-server: the registry tests.)
packages=(busybox-static qemu-system-x86 cpio dnsutils wrk redis-tools golang-go nodejs systemd protobuf-compiler libprotobuf-dev etcd-server)
for definition in images/*/image.toml; do
    for pkg in $(sed -n 's/^apt *= *\[\(.*\)\]/\1/p' "$definition" | tr -d '",'); do
        packages+=("$pkg")
    done
done

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # postfix (images/postfix) is installed for its programs only: "No configuration"
    # leaves the host without a main.cf, so no host postfix starts and takes port 25.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt=(apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends)
    if ! "${apt[@]}" "${missing[@]}" >/dev/null; then
        apt-get -o DPkg::Lock::Timeout=600 update >/dev/null
        "${apt[@]}" "${missing[@]}" >/dev/null
    fi
fi

# The S3 store's tests run against moto's S3 server on loopback (snapshots/tests/s3.rs).
# moto 5.2.5 or later: 5.2.1 answered CompleteMultipartUpload with an XML root that the AWS
# SDKs refuse.
if ! python3 -c 'import sys, moto.server, flask_cors; from importlib.metadata import version
sys.exit(tuple(int(p) for p in version("moto").split(".")[:3]) < (5, 2, 5))' 2>/dev/null; then
    echo "setup: installing moto[server] (the S3 server for the tests)" >&2
    python3 -m pip install --quiet --root-user-action=ignore 'moto[server]>=5.2.5'
fi

# clippy and rustfmt, which the test command runs.
for component in clippy rustfmt; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "setup: adding the rustup component $component" >&2
        rustup component add "$component"
    fi
done

if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing. Picocenter runs apps in KVM guests; every host needs it." >&2
    exit 1
fi
