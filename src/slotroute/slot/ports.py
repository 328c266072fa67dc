"""Port allocation for backend processes from the configured range."""

from __future__ import annotations

import errno
import random
import socket


class NoFreePort(RuntimeError):
    """Every port of the range is taken or in use."""


def port_is_free(host: str, port: int) -> bool:
    """Return whether a listener could bind host:port now.

    The test sets SO_REUSEADDR as HTTP servers do (llama-server, Python's
    http.server), so a port whose only sockets are in TIME_WAIT counts as free,
    while a port with a live listener does not.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class PortAllocator:
    """Hands out ports from [low, high], never one held by another slot or in use."""

    def __init__(self, low: int, high: int, reserved: tuple[int, ...] = ()):
        self.low = low
        self.high = high
        self._reserved = set(reserved)
        self._owners: dict[int, str] = {}
        # Start at a random port: two slotds sharing a range then rarely race
        # for the same port between the free check and the backend's bind.
        self._next = random.randint(low, high)

    def allocate(self, owner: str, host: str = "127.0.0.1") -> int:
        """Return a free port for `owner`, checked free on `host` just now."""
        size = self.high - self.low + 1
        for offset in range(size):
            port = self.low + (self._next - self.low + offset) % size
            if port in self._owners or port in self._reserved:
                continue
            if port_is_free(host, port):
                self._owners[port] = owner
                self._next = port + 1 if port < self.high else self.low
                return port
        raise NoFreePort(
            f"no free port in {self.low}-{self.high} for slot {owner!r}: "
            f"{len(self._owners)} held by slots, the rest in use by other programs; "
            "widen [slotd] ports or stop what holds them"
        )

    def release(self, port: int, owner: str | None = None) -> None:
        """Free `port`; with `owner` given, only if that slot still owns it."""
        if owner is None or self._owners.get(port) == owner:
            self._owners.pop(port, None)

    def owner(self, port: int) -> str | None:
        return self._owners.get(port)
