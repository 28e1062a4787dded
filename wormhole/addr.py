"""Control-channel addresses: `tcp://host:port`, `host:port`, `:port`, `host`, `unix:///path`
(or `unix://relative/path`, resolved against the working directory)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .spec import SpecError, hostport, split_host_port

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


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "unix"
    host: str | None = None  # tcp: None = all addresses (daemon)
    port: int = DEFAULT_PORT
    path: str | None = None  # unix

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
        try:
            host, port = split_host_port(rest, f"address {text!r}")
        except SpecError as e:
            raise AddressError(str(e)) from None
        return cls("tcp", host if host is not None else default_host,
                   port if port is not None else DEFAULT_PORT)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"tcp://{hostport(self.host or '', self.port)}"
