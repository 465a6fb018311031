"""Listening sockets: a taken or unknown address is found before a model loads (a second, not after
minutes of loading) and reported as one line, for the body server, the gateway and the UI alike."""

from __future__ import annotations

import errno
import socket

from lambdasplit.errors import LambdaSplitError


def bind_error(host: str, port: int, exc: OSError) -> LambdaSplitError:
    """The one-line error for a failed bind, with the usual remedy for a port in use."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += " (another process holds it; pick another --port, or 0 for a free one)"
    return LambdaSplitError(f"cannot listen on {host}:{port}: {reason}")


def check_bindable(host: str, port: int) -> None:
    """Bind and release (host, port) the way the servers will (SO_REUSEADDR, every address of host)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LambdaSplitError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise bind_error(host, port, exc) from None


def claim_shared_port(port: int) -> socket.socket | None:
    """Hold `port` for one `serve --front-ends` server (Linux) until the returned socket closes.

    Its front ends bind with SO_REUSEPORT, which lets any process of the same user bind the port
    too: two such servers started together (each found the port free, then loaded its model) would
    both listen and silently split the devices between them. The claim is an abstract Unix socket
    named after the port, which one process at a time can bind and which goes with the process."""
    if port == 0:
        return None  # the kernel gives a port of 0 a free one
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0lambdasplit-serve-port-{port}")
    except OSError:
        claim.close()
        raise LambdaSplitError(
            f"cannot listen on port {port}: another `lambdasplit serve --front-ends` on this host holds it "
            "(it may still be loading its model); pick another --port, or 0 for a free one"
        ) from None
    return claim
