#!/usr/bin/env bash
# Run the appliance with a demo: a VR, two guests, a management host and an outsider
# in network namespaces; pushes over SSH; guests fetch metadata and passwords.
# Usage: scripts/demo.sh [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m vr demo "$@"
