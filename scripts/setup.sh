#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently: Debian packages for the real apps
# under test. Quick when everything is already there.
set -euo pipefail

packages=(busybox-static qemu-system-x86 cpio dnsutils)

missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# The S3 store's tests run against moto's S3 server on loopback (snapshots/tests/s3.rs).
# moto 5.2.5 or later: 5.2.1 answered CompleteMultipartUpload with an XML root that the AWS
# SDKs refuse.
if ! python3 -c 'import sys, moto.server, flask_cors; from importlib.metadata import version
sys.exit(tuple(int(p) for p in version("moto").split(".")[:3]) < (5, 2, 5))' 2>/dev/null; then
    echo "setup: installing moto[server] (the S3 server for the tests)" >&2
    python3 -m pip install --quiet 'moto[server]>=5.2.5'
fi

if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing. Picocenter runs apps in KVM guests; every host needs it." >&2
    exit 1
fi
