#!/usr/bin/env bash
# The whole test suite: lint, types, unit tests and root tests in network namespaces.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check vr tests scripts bench
.venv/bin/ruff format --check vr tests scripts bench
.venv/bin/mypy vr
exec .venv/bin/pytest -q "$@"
