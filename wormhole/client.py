"""`call_once(addr, key, method, params)`: one call on a fresh TLS-PSK connection with
blocking sockets, the control channel's client side as the CLI uses it.

The asyncio client (`async with connect(addr, key) as c`, what a daemon uses to call
another) is in async_client.py, apart from this module: the CLI starts afresh for every
command, and importing asyncio alone would take longer than a whole `wormhole list`
should."""

from __future__ import annotations

import socket
import ssl

from . import protocol
from .addr import Address, literal_family
from .keys import client_context
from .protocol import Failed, RpcError

CONNECT_TIMEOUT = 5.0


def failure_reason(e: BaseException) -> str:
    """Why a connection to a daemon failed, for the user (a wrong key reads as a failed handshake)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return "it presented a certificate, so it is not a wormholed holding our key (refused)"
    if isinstance(e, (ssl.SSLError, ConnectionResetError, EOFError)):
        return f"TLS-PSK handshake failed; is the key the same on both sides? ({e.__class__.__name__})"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


def _blocking_socket(addr: Address, timeout: float) -> socket.socket:
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    host = addr.host or "127.0.0.1"
    family = literal_family(host)
    if not family:  # a name: resolved (create_connection tries each address)
        sock = socket.create_connection((host, addr.port), timeout=timeout)
    else:  # no getaddrinfo: its first call in a process costs ~2 ms (NSS set-up), more than the round trip
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((host, addr.port))
        except BaseException:
            sock.close()
            raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def call_once(addr: Address, key: bytes, method: str, params: dict | None = None, *,
              timeout: float = CONNECT_TIMEOUT, identity: str | None = None, ctx: ssl.SSLContext | None = None):
    """One call on a fresh connection, with blocking sockets: what the CLI makes. No event loop
    to build, and ssl's own socket I/O: a call costs the connection, the handshake and one
    round trip. ctx: a client_context(key, identity) made beforehand. Raises RpcError: the
    daemon's, or Failed (unreachable, wrong key, connection lost)."""
    ctx = ctx or client_context(key, identity)
    try:
        raw = _blocking_socket(addr, timeout)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=None)  # the handshake, within the timeout
        except BaseException:
            raw.close()
            raise
    except TimeoutError:
        raise Failed(f"cannot reach wormholed at {addr}: no answer within {timeout:g} s") from None
    except (OSError, ssl.SSLError, EOFError) as e:
        raise Failed(f"cannot reach wormholed at {addr}: {failure_reason(e)}") from None
    with sock:
        sock.settimeout(None)  # a create may take long (a trigger starting a container)
        try:
            sock.sendall(protocol.request(1, method, params))
            framer = protocol.LineFramer()
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    raise EOFError("the daemon closed the connection")
                lines = framer.feed(data)
                if lines:
                    return protocol.parse_response(lines[0], 1)
        except (OSError, EOFError, ssl.SSLError) as e:
            raise Failed(f"lost the connection to wormholed at {addr}: {failure_reason(e)}") from None


__all__ = ["call_once", "failure_reason", "CONNECT_TIMEOUT", "RpcError"]
