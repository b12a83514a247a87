#!/usr/bin/env bash
# Installs what the demo and the tests need, idempotently: Debian packages for the real apps
# under test. Quick when everything is already there.
set -euo pipefail

packages=(busybox-static qemu-system-x86 cpio)

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

if [ ! -e /dev/kvm ]; then
    echo "error: /dev/kvm is missing. Picocenter runs apps in KVM guests; every host needs it." >&2
    exit 1
fi
