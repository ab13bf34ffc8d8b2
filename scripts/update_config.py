#!/usr/bin/env python3
"""CloudStack's /opt/cloud/bin/update_config.py, served by vr: ``update_config.py FILE [false]``."""

import sys

from vr.cli import main

if __name__ == "__main__":
    sys.exit(main(["update-config", *sys.argv[1:]]))
