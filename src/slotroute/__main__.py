"""Allow `python -m slotroute`."""

import sys

from slotroute.cli import main

sys.exit(main())
