#!/bin/bash
# Install what tether's demo, tests and benchmarks need on a fresh Debian 12 machine, skipping
# whatever is already there.  Idempotent; run by `make deps` (and so by `make demo`/`make test`).
#
# As root: Debian packages, /dev/net/tun mode 0666 (as on common distros), the unprivileged
# test user, and the venv in a world-readable place (/opt/tether/venv, linked from .venv) so that
# the test user can run `tether` too.  As a normal user: only the venv, in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(nftables libnftables1 iproute2 iperf3 socat slirp4netns passt wireguard-go
          wireguard-tools runc crun busybox-static python3 python3-venv procps curl
          iputils-ping dnsutils)
TEST_USER=${TETHER_TEST_USER:-tether-test}
SYSTEM_VENV=/opt/tether/venv

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "$(id -u)" = 0 ]; then
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install-deps: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    [ -c /dev/net/tun ] || { mkdir -p /dev/net; mknod -m 0666 /dev/net/tun c 10 200; }
    chmod 0666 /dev/net/tun
    id -u "$TEST_USER" >/dev/null 2>&1 || useradd --system --create-home --shell /bin/bash "$TEST_USER"
    venv=$SYSTEM_VENV
    mkdir -p "$(dirname "$venv")"
    chmod 0755 "$(dirname "$venv")"
    if [ ! -L .venv ] || [ "$(readlink .venv)" != "$venv" ]; then
        rm -rf .venv
        ln -s "$venv" .venv
    fi
else
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install-deps: missing Debian packages: ${missing[*]}" >&2
        echo "install-deps: run 'sudo make deps' once, or: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
        exit 2
    fi
    venv=.venv
fi

# Debian's interpreter, not a pyenv one under /root: the test user must be able to run it.
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$venv/bin/python" -m pip install -q --disable-pip-version-check ".[test,bench]"
# A plain (non-editable) install: the package is copied into the venv, readable by every user.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall .
[ "$(id -u)" = 0 ] && chmod -R a+rX "$venv"
echo "install-deps: ok ($venv)"
