#!/bin/sh
# CloudStack's /opt/cloud/bin/vr_cfg.sh -c <cfg>: apply a VR-<uuid>.cfg batch with vr.
# Uses the installed `vr` command; from a checkout, `$PYTHON -m vr` with this tree.
if command -v vr >/dev/null 2>&1; then
    exec vr apply-cfg "$@"
fi
here=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m vr apply-cfg "$@"
