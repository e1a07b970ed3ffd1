#!/usr/bin/env bash
# Install what the tests need on Debian 12 (as root), then lint, type-check and run the tests.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m kamailio -x  # arguments go to pytest
#
# Idempotent: packages already installed are not installed again. The exit status is pytest's
# (or that of the first failing step: apt, pip, ruff or mypy).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# kamailio lives in /usr/sbin, which a CI runner's PATH may lack.
export PATH="${PATH}:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive
# Debian 12 marks its python3 as externally managed (PEP 668); installing into it as root is
# what this throw-away test box is for.
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

PACKAGES=(
    kamailio kamailio-json-modules kamailio-extra-modules kamailio-utils-modules
    kamailio-tls-modules  # tls.so: the DMQ-over-TLS tests
    sip-tester dnsmasq-base nftables iproute2 ca-certificates
    curl  # tests/rpc: JSON-RPC over HTTP as operators call it
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done
if ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi

# Debian's kamailio package may start a system kamailio (listening on 5060 on every interface)
# when it is installed. The tests run their own instances, so make sure that one is gone.
stop_system_kamailio() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl stop kamailio.service >/dev/null 2>&1 || true
        systemctl disable kamailio.service >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/kamailio ]; then
        /etc/init.d/kamailio stop >/dev/null 2>&1 || true
    fi
    local pidfile pid
    for pidfile in /run/kamailio/kamailio.pid /var/run/kamailio/kamailio.pid; do
        if [ -s "${pidfile}" ]; then
            pid="$(cat "${pidfile}")"
            if [ -n "${pid}" ] && [ "$(cat "/proc/${pid}/comm" 2>/dev/null)" = "kamailio" ]; then
                kill -TERM "${pid}" 2>/dev/null || true
            fi
        fi
    done
}

if [ "${#missing[@]}" -gt 0 ]; then
    echo "+ installing: ${missing[*]}"
    # Keep the package scripts from starting services while we install (policy-rc.d "101":
    # action forbidden). Only if no policy exists yet, and removed again afterwards.
    created_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt_status=0
    { apt-get update && apt-get install -y "${missing[@]}"; } || apt_status=$?
    if [ -n "${created_policy}" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ "${apt_status}" -ne 0 ]; then
        echo "apt-get failed with status ${apt_status}" >&2
        exit "${apt_status}"
    fi
fi
stop_system_kamailio

echo "+ pip install -e .[test]"
python3 -m pip install --root-user-action=ignore -q -e '.[test]'

echo "+ ruff check"
python3 -m ruff check pydmq tests bench

echo "+ mypy"
python3 -m mypy
python3 -m mypy --explicit-package-bases tests/support

echo "+ pytest"
python3 -m pytest -q -p no:cacheprovider "$@"
