"""`python -m node_agent` is `fleetscope agent`."""

import sys

from fleetscope.cli import main

sys.exit(main(["agent", *sys.argv[1:]]))
