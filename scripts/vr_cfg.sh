#!/bin/sh
# CloudStack's /opt/cloud/bin/vr_cfg.sh -c <cfg>: apply a VR-<uuid>.cfg batch with vr.
exec vr apply-cfg "$@"
