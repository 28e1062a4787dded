"""A tunnel half as recorded in STATE/tunnels/PEER.json, and its status.

One record type for both kinds of tunnel: the fields every half has (peer,
overlay pair, underlay endpoints, ports), then those of its kind —
WireGuard's key pair and the peer's public key; ipsec's reqid and the SPIs
and keys of its two SAs. Records written before a field existed read back
with its default. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
from dataclasses import dataclass

from .ipsec import Half
from .ipam import tunnel_id
from .wgconf import WgConfig, WgPeer, derive_psk, from_b64

KEEPALIVE = 25  # seconds: keeps NAT mappings open so a peer behind NAT stays reachable
TYPES = ("wireguard", "ipsec")


@dataclass(frozen=True)
class Tunnel:
    """This host's half of a tunnel."""

    peer_id: str
    host: str  # the peer's daemon as named here (what tunnel-delete matches)
    type: str  # "wireguard" or "ipsec"
    backend: str  # "kernel" or "wireguard-go" (wireguard); "xfrm" (ipsec)
    ifname: str  # wireguard: the interface; ipsec: "" (policies, no interface)
    local_ip: str  # overlay, this end
    remote_ip: str  # overlay, the far end
    local_endpoint: str  # underlay address the peer sends to
    local_port: int  # wireguard: listen port; ipsec: ESP-in-UDP port, 0 for plain ESP
    remote_endpoint: str
    remote_port: int
    private_key: str = ""  # wireguard, base64
    peer_public_key: str = ""  # wireguard, base64
    reqid: int = 0  # ipsec
    spi_in: int = 0  # ipsec: the SA the peer sends with (SPI and key chosen here)
    key_in: str = ""
    spi_out: int = 0  # ipsec: the SA this host sends with (chosen by the peer)
    key_out: str = ""

    @classmethod
    def from_record(cls, record: dict) -> Tunnel:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(record) - set(fields)
        missing = {n for n, f in fields.items() if f.default is dataclasses.MISSING} - set(record)
        if unknown or missing:
            raise ValueError(f"fields {sorted(unknown | missing)} unknown or missing")
        for name, value in record.items():
            kind = int if fields[name].type == "int" else str
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"field {name!r} has the wrong type")
        t = cls(**record)
        if t.type not in TYPES:
            raise ValueError(f"unknown tunnel type {t.type!r}")
        for ip in (t.local_ip, t.remote_ip, t.local_endpoint, t.remote_endpoint):
            ipaddress.ip_address(ip)
        if t.type == "wireguard":
            from_b64(t.private_key), from_b64(t.peer_public_key)
        else:
            half = t.half()
            half.states(), half.policies()
        return t

    def config(self, secret: bytes, self_id: str) -> WgConfig:
        """WireGuard: the device configuration of this half."""
        psk = derive_psk(secret, tunnel_id(self_id, self.peer_id))
        bits = ipaddress.ip_address(self.remote_ip).max_prefixlen
        return WgConfig(from_b64(self.private_key), self.local_port, WgPeer(
            from_b64(self.peer_public_key), psk, (self.remote_endpoint, self.remote_port),
            (f"{self.remote_ip}/{bits}",), KEEPALIVE))

    def half(self) -> Half:
        """ipsec: what the kernel carries for this half."""
        return Half(self.local_ip, self.remote_ip, self.local_endpoint, self.remote_endpoint, self.reqid,
                    self.spi_in, _key(self.key_in), self.spi_out, _key(self.key_out),
                    self.local_port, self.remote_port)


def _key(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an ipsec key is not base64") from None


@dataclass(frozen=True)
class Status:
    """What is running for a half: counters, and WireGuard's latest handshake."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    latest_handshake: float | None = None
