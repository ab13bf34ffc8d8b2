import sys

from vr.cli import main

sys.exit(main())
