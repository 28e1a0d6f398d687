"""`python -m fleetscope` is the `fleetscope` command."""

import sys

from fleetscope.cli import main

sys.exit(main())
