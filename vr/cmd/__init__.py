"""The ``vr`` subcommands: one module each, argparse and wiring only."""
