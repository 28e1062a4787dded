"""The handover record: what a daemon hands its successor beside the fds, and its encoding.

Pure: no sockets. Everything a splice relay holds is in the kernel (two sockets, two pipes
with their bytes), so what travels as data is small: which fd is what, a half's state
(bytes buffered in memory, bytes in its pipe, EOF passed on), the counters, and the words
each wormhole was made with. The fds travel beside it (SCM_RIGHTS, or systemd's fd store),
each named `FD_PREFIX + index` in this record's fd table: systemd gives them back in
another order, matched by name.

The record is JSON, versioned: `decode` refuses a version it does not know, so a daemon
never half-reads an older or newer one's record. Version 1:

    {"magic": MAGIC, "version": 1, "from": {"pid", "version"}, "fds": N,
     "control": [fd, ...],                      # listening control sockets
     "wormholes": [{"id", "words", "saved",     # saved: it has a record in the state dir
                    "owner", "owner_label", "tunnel", "ctx",   # a remote child's (else null)
                    "segments": {SEGMENT_ID: {
                        "head": fd, "active": bool,
                        "containers": {PLACE: CONTAINER_ID},   # docker-run places, to adopt
                        "stats": [total, bytes_in, bytes_out, refused],
                        "relays": [{"client": fd, "tail": fd, "tail_index": k,
                                    "up": HALF, "down": HALF}],
                        "clients": [fd, ...],   # accepted, not yet relayed: dialled again
                        "flows": [{"addr": [host, port, ...], "sock": fd, "tail_index": k}]}}}]}
    HALF = {"pipe": [r_fd, w_fd] or null, "pending": bytes in the pipe,
            "buffered": base64 of bytes read and not yet written, "done": EOF passed on}

`fd` values are indices into the fd table (0 .. fds-1).
"""

from __future__ import annotations

import base64
import binascii
import json

MAGIC = "wormhole-handover"
VERSION = 1
SUPPORTED = (1,)  # versions this daemon reads
FD_PREFIX = "wh"  # an fd's name: ASCII, no ':', at most 255 (systemd's FDNAME rules)
STATE_NAME = "wh-state"  # the record's own fd (a memfd) in systemd's store


class HandoverError(Exception):
    """A record this daemon cannot take; the message says why."""


def fd_name(index: int) -> str:
    return f"{FD_PREFIX}{index}"


def fd_index(name: str) -> int | None:
    """The index an fd's name carries; None for a name that is not ours."""
    if name.startswith(FD_PREFIX) and name[len(FD_PREFIX):].isascii() and name[len(FD_PREFIX):].isdigit():
        return int(name[len(FD_PREFIX):])
    return None


class FdTable:
    """Numbers the fds of a handover in the order they are added."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return len(self.fds) - 1

    def names(self) -> list[str]:
        return [fd_name(i) for i in range(len(self.fds))]


def half(pipe: tuple[int, int] | None, pending: int, buffered: bytes, done: bool) -> dict:
    return {"pipe": list(pipe) if pipe else None, "pending": pending,
            "buffered": base64.b64encode(buffered).decode(), "done": done}


def half_buffered(h: dict) -> bytes:
    return base64.b64decode(h["buffered"], validate=True)


def encode(state: dict) -> bytes:
    """The record's bytes; `state` without magic and version (added here)."""
    return json.dumps({"magic": MAGIC, "version": VERSION, **state}, separators=(",", ":")).encode()


def peek_version(data: bytes) -> int | None:
    """The version a record says it is, or None if it is not a record at all."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or msg.get("magic") != MAGIC or not isinstance(msg.get("version"), int):
        return None
    return msg["version"]


def decode(data: bytes, fd_count: int, supported: tuple[int, ...] = SUPPORTED) -> dict:
    """The record, checked against the fds that came with it; HandoverError if it is not one
    of ours, of a version not in `supported`, or not well formed."""
    version = peek_version(data)
    if version is None:
        raise HandoverError("not a wormhole handover record")
    if version not in supported:
        raise HandoverError(f"handover record version {version}; this wormholed reads "
                            f"{', '.join(map(str, supported))}")
    state = json.loads(data)
    try:
        _check(state, fd_count)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise HandoverError(f"malformed handover record: {type(e).__name__}: {e}") from None
    return state


def _fd(value, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise ValueError(f"fd index {value!r} not in 0..{count - 1}")
    return value


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"bad count {value!r}")
    return value


def _check(state: dict, count: int) -> None:
    if state["fds"] != count:
        raise ValueError(f"the record names {state['fds']} fds, {count} came")
    for fd in state["control"]:
        _fd(fd, count)
    for w in state["wormholes"]:
        if not isinstance(w["id"], str) or not all(isinstance(x, str) for x in w["words"]):
            raise ValueError("a wormhole's id and words are strings")
        for seg in w["segments"].values():
            if seg["head"] is not None:
                _fd(seg["head"], count)
            for n in seg["stats"]:
                _count(n)
            for r in seg["relays"]:
                _fd(r["client"], count), _fd(r["tail"], count), _count(r.get("tail_index", 0))
                for h in (r["up"], r["down"]):
                    if h["pipe"] is not None:
                        _fd(h["pipe"][0], count), _fd(h["pipe"][1], count)
                    _count(h["pending"])
                    half_buffered(h)
                    if not isinstance(h["done"], bool):
                        raise ValueError("a half's done is true or false")
            for fd in seg["clients"]:
                _fd(fd, count)
            for f in seg["flows"]:
                _fd(f["sock"], count)
                if not isinstance(f["addr"], list):
                    raise ValueError("a flow's addr is a list")
