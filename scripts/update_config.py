#!/usr/bin/env python3
"""CloudStack's /opt/cloud/bin/update_config.py: ``update_config.py <file> [false]``.

Installed into the appliance with the ``vr`` package; run from a checkout it finds
the package next to this folder.
"""

import sys
from pathlib import Path

try:
    from vr.cli import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vr.cli import main

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        # CloudStack's script exits 1 on a wrong argument count (argparse would say 2)
        print("usage: update_config.py <file> [false]", file=sys.stderr)
        sys.exit(1)
    sys.exit(main(["update-config", *sys.argv[1:]]))
