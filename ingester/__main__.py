"""`python -m ingester` is `fleetscope ingest`."""

import sys

from fleetscope.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
