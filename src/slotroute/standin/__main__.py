"""Run the stand-in backend: ``python -m slotroute.standin --port PORT``."""

from slotroute.standin.server import main

raise SystemExit(main())
