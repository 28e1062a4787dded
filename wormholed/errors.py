"""The daemon's own errors, and their conversion to and from JSON-RPC errors.

Two kinds, as the CLI reports them: `Refused` (the caller asked for something
wrong: a bad spec, an unknown id, a missing namespace) and `Failed` (the system
or a peer failed while doing what was asked). Daemon code raises these; only
the API edge (`api.py`) turns them into wire errors, and only the peer client
(`peers.py`) turns a peer's wire error back into one of them.
"""

from __future__ import annotations

from wormhole import protocol
from wormhole.protocol import RpcError


class DaemonError(Exception):
    """What the daemon could not do; `str()` is one line for the user."""

    code = protocol.FAILED


class Refused(DaemonError):
    code = protocol.REFUSED


class Failed(DaemonError):
    code = protocol.FAILED


class Busy(Failed):
    """The peer is doing the same from its end (building the tunnel to us): try again."""

    code = protocol.BUSY


def to_rpc(e: DaemonError) -> RpcError:
    return RpcError(e.code, str(e))


def from_rpc(e: RpcError, prefix: str = "") -> DaemonError:
    """A peer's error as ours; `prefix` (the peer's name) is added unless it is there already."""
    message = str(e) if not prefix or prefix in str(e) else f"{prefix}: {e}"
    if e.code == protocol.BUSY:
        return Busy(message)
    return Refused(message) if e.code in (protocol.REFUSED, protocol.INVALID_PARAMS) else Failed(message)
