"""Control-channel addresses: `tcp://host:port`, `host:port`, `:port`, `host`, `unix:///path`
(or `unix://relative/path`, resolved against the working directory).

The CLI parses its -H address for every command, so the usual ones (a unix socket, an
IPv4 literal, a port) are read without the create grammar, spec.py, whose import costs
more than the rest of a `wormhole list` (its dataclasses, ipaddress, docker_args). Any
other form (a name, IPv6, anything wrong) is left to spec's split_host_port, which the
fast path agrees with on what it accepts."""

from __future__ import annotations

import os

import _socket as socket  # socket's own functions and constants; `socket` imports enum (see client.py)

from .record import Record

DEFAULT_PORT = 9999


class AddressError(ValueError):
    pass


def literal_family(host: str) -> int:
    """AF_INET or AF_INET6 for an address literal, 0 for a name (to resolve)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except OSError:
            pass
    return 0


def _literal_host_port(text: str) -> tuple[str | None, int | None] | None:
    """`[IPV4][:PORT]` as split_host_port reads it, for an IPv4 address written canonically
    and a port of at most 5 digits; None for anything else (the grammar decides)."""
    host, sep, port = text.partition(":")
    try:
        if host and socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, host)) != host:
            return None
    except (OSError, ValueError):  # not an IPv4 literal; ValueError: a NUL or non-ASCII
        return None
    if sep and not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        return None
    return host or None, int(port) if sep else None


class Address(Record):
    """A plain class, not a dataclass: see record.py."""

    __slots__ = ("kind", "host", "port", "path")

    def __init__(self, kind: str, host: str | None = None, port: int = DEFAULT_PORT, path: str | None = None):
        self.kind = kind  # "tcp" or "unix"
        self.host = host  # tcp: None = all addresses (daemon)
        self.port = port
        self.path = path  # unix

    @classmethod
    def parse(cls, text: str, default_host: str | None = None) -> Address:
        if text.startswith("unix://"):
            path = text[len("unix://"):]
            if not path:
                raise AddressError(f"bad address {text!r}: write unix:///absolute/path or unix://relative/path")
            # A relative path (unix://./sock) is resolved against the working directory, now.
            return cls("unix", path=os.path.abspath(path))
        rest = text[len("tcp://"):] if text.startswith("tcp://") else text
        if "://" in rest:
            raise AddressError(f"bad address {text!r}: use tcp:// or unix://")
        if (literal := _literal_host_port(rest)) is not None:
            host, port = literal
        else:
            from .spec import SpecError, split_host_port
            try:
                host, port = split_host_port(rest, f"address {text!r}")
            except SpecError as e:
                raise AddressError(str(e)) from None
        return cls("tcp", host if host is not None else default_host,
                   port if port is not None else DEFAULT_PORT)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        from .spec import hostport
        return f"tcp://{hostport(self.host or '', self.port)}"
