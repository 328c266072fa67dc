"""Listen addresses: parsing "HOST:PORT" and telling loopback hosts apart."""

from __future__ import annotations

import ipaddress


def parse_listen(address: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[IPV6]:PORT" into host and port; raise ValueError if invalid."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not host or not port_text.isdigit():
        raise ValueError(f"invalid address {address!r}; use HOST:PORT such as 127.0.0.1:50051")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid port {port} in {address!r}; use 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def is_loopback(host: str) -> bool:
    """Return whether a listen host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """Join host and port, bracketing IPv6 hosts."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"
