#!/usr/bin/env bash
# Install pydmq and run the main job: the 3-node demo cluster on 127.0.0.1 (arguments go to `pydmq demo`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_BREAK_SYSTEM_PACKAGES=1  # Debian 12's python3 is externally managed (PEP 668)
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m pip install --root-user-action=ignore -q -e .
exec python3 -m pydmq demo "$@"
