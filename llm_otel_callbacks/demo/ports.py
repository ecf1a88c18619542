"""Free TCP ports for the servers the demo and tests start (Ray metrics, Serve HTTP, Prometheus).

A port from ``bind(0)`` comes from the kernel's ephemeral range, the same range every outgoing
connection and every Ray gRPC server draws from. Between picking it and the server binding it,
one of Ray's own processes can take it (seen: Ray's metrics agent dying with EADDRINUSE and the
raylet fate-sharing with it). Ports are therefore picked at random *below* the ephemeral range,
where nothing is handed out automatically, and checked free on every interface.
"""

from __future__ import annotations

import random
import socket

_FALLBACK_EPHEMERAL_LOW = 32768
_LOW = 20000  # above the well-known and most registered service ports
_ATTEMPTS = 200


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def _is_free(port: int) -> bool:
    # Servers here bind 127.0.0.1 or 0.0.0.0: the port must be free for both.
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """A TCP port that is free now and outside the kernel's ephemeral range."""
    high = _ephemeral_low() - 1
    if high - _LOW >= 1000:
        rng = random.SystemRandom()  # not the global RNG: tests may seed that
        for _ in range(_ATTEMPTS):
            port = rng.randint(_LOW, high)
            if port not in exclude and _is_free(port):
                return port
    # Odd port configuration: fall back to the kernel's choice.
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports."""
    out: list[int] = []
    for _ in range(n):
        out.append(free_port(exclude=set(out)))
    return out
