"""slotroute: a slot supervisor (slotd) and a model dispatcher for a local AI box."""

__version__ = "0.1.0"

import os as _os

# slotd forks backends while gRPC threads run; gRPC's fork handlers would only
# log that they are skipped, since the child execs at once.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
