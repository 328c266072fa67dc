"""pytest setup shared by every test module."""

# Importing slotroute before any test module imports grpc sets
# GRPC_ENABLE_FORK_SUPPORT=false in time. With gRPC's fork support on, a
# backend that slotd forks while gRPC threads run can crash with SIGSEGV or
# SIGABRT between fork and exec.
import slotroute  # noqa: F401
