"""Run the `slotroute` command on uvloop's event loop.

`python bench/serve.py dispatcher --config FILE` behaves like
`python -m slotroute dispatcher --config FILE`, but asyncio.run() inside the
command creates a uvloop loop. The orchestrator uses it for `--uvloop` runs.
"""

from __future__ import annotations

import sys

from common import use_uvloop

from slotroute.cli import main

if __name__ == "__main__":
    use_uvloop(True)
    sys.exit(main(sys.argv[1:]))
