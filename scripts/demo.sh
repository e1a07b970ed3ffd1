#!/usr/bin/env bash
# Install pydmq and run its demo; arguments go to `pydmq demo`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_BREAK_SYSTEM_PACKAGES=1  # Debian 12's python3 is externally managed (PEP 668)
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m pip install --root-user-action=ignore -q -e .
exec pydmq demo "$@"
