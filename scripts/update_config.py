#!/usr/bin/env python3
"""CloudStack's /opt/cloud/bin/update_config.py: ``update_config.py <file> [false]``."""

import sys

from vr.cli import main

if __name__ == "__main__":
    sys.exit(main(["update-config", *sys.argv[1:]]))
