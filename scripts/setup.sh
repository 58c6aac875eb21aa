#!/usr/bin/env bash
# Set up gpufleet on a fresh Debian 12 machine: system packages for the lab, and a virtualenv
# (.venv) with gpufleet and its test tools. Run as root (or with sudo). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

# docker-registry and apache2-utils (htpasswd): a real private registry for registry_auth's lab test
# (test_images_lab.py runs the binary itself, with its own config; the package's service plays no part)
# containernetworking-plugins and iptables: podman's bridge network, which single-node runs get (their
# own network namespace, ports published on the host's 127.0.0.1 by CNI's portmap)
# chromium: the browser the web console's tests drive (Playwright, pointed at /usr/bin/chromium)
PACKAGES=(python3 python3-venv python3-pip openssh-server openssh-client iproute2 util-linux
          podman runc containernetworking-plugins iptables busybox-static sudo passwd git postgresql
          docker-registry apache2-utils chromium)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done (.venv/bin/gpufleet)"
