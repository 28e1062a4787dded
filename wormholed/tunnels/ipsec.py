"""ipsec tunnels: ESP in tunnel mode between the two hosts' underlay addresses.

A tunnel half here is two SAs and three policies (xfrm.py builds the
messages): the SA this host sends with (`spi_out`, keyed by the peer) and the
one it receives with (`spi_in`, whose SPI and key this host chose and sent to
the peer over the TLS-PSK control channel); policies out, in and fwd for the
overlay pair, with one ESP tunnel template between the underlay addresses and
this tunnel's reqid. The overlay address sits on `lo`, and a route to the far
overlay address leaves by the underlay link with the local overlay address as
its source, as the original tool did. With `udp`, ESP rides in UDP
(RFC 3948) between ports of -P, and the daemon holds the encapsulation socket
(UDP_ENCAP_ESPINUDP) that receives it; it is made again when the daemon
finds the tunnel at its next start.

Keys are fresh random bytes per tunnel and per rekey (`tunnel-create
--rekey`): ipsec keys do not rotate by themselves as WireGuard's session keys
do. The algorithm is xfrm.gcm_aes (rfc4106(gcm(aes)), see xfrm.py for why).

The states and policies a daemon makes carry reqids of its own range
(REQID_BASE), so that those without a record (left by a crash) can be found
and removed without touching anyone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import random
import secrets
import socket
from collections.abc import Iterable
import dataclasses
from dataclasses import dataclass

from . import iface
from .xfrm import AEAD_GCM_KEY_LEN, Algorithm, Encap, Policy, Selector, State, Xfrm, algorithm_missing, esp_missing, \
    gcm_aes

REQID_BASE = 0x57480000  # "WH": the reqids of wormhole's tunnels are REQID_BASE + 1..0xffff
SPI_MIN = 0x100  # SPIs below 256 are reserved (RFC 4303)
UDP_ENCAP = 100  # setsockopt(SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
UDP_ENCAP_ESPINUDP = 2


class IpsecError(Exception):
    """The kernel would not build it; the message is fit for the user."""


# --- pure: allocation and the half's states and policies ---------------------------------------

def new_spi(used: Iterable[int], rng: random.Random | None = None) -> int:
    taken, rng = set(used), rng or random.SystemRandom()
    while True:
        spi = rng.randrange(SPI_MIN, 2**32)
        if spi not in taken:
            return spi


def new_reqid(used: Iterable[int], rng: random.Random | None = None) -> int:
    taken, rng = set(used), rng or random.SystemRandom()
    free = [n for n in range(1, 0x10000) if REQID_BASE + n not in taken]
    if not free:
        raise IpsecError("no free reqid for another ipsec tunnel (65535 in use)")
    return REQID_BASE + rng.choice(free)


def ours(reqid: int) -> bool:
    return REQID_BASE < reqid <= REQID_BASE + 0xFFFF


def new_key() -> bytes:
    return secrets.token_bytes(AEAD_GCM_KEY_LEN)


@dataclass(frozen=True)
class Half:
    """What one host builds for a tunnel (its view: local = this host)."""

    local_ip: str  # overlay
    remote_ip: str
    local_endpoint: str  # underlay
    remote_endpoint: str
    reqid: int
    spi_in: int
    key_in: bytes
    spi_out: int
    key_out: bytes
    local_port: int = 0  # udp: the ESP-in-UDP ports; 0 = plain ESP
    remote_port: int = 0

    def selector(self, src: str, dst: str) -> Selector:
        bits = ipaddress.ip_address(src).max_prefixlen
        return Selector(src=src, dst=dst, src_len=bits, dst_len=bits)

    def states(self) -> tuple[State, State]:
        """(out, in): the SA this host sends with, and the one it receives with."""
        out_encap = in_encap = None
        if self.local_port:
            out_encap, in_encap = Encap(self.local_port, self.remote_port), Encap(self.remote_port, self.local_port)
        out = State(self.local_endpoint, self.remote_endpoint, self.spi_out, self.reqid,
                    aead=gcm_aes(self.key_out), encap=out_encap)
        in_ = State(self.remote_endpoint, self.local_endpoint, self.spi_in, self.reqid,
                    aead=gcm_aes(self.key_in), encap=in_encap)
        return out, in_

    def policies(self) -> tuple[Policy, Policy, Policy]:
        out_sel, in_sel = self.selector(self.local_ip, self.remote_ip), self.selector(self.remote_ip, self.local_ip)
        return (Policy(out_sel, "out", self.local_endpoint, self.remote_endpoint, self.reqid),
                Policy(in_sel, "in", self.remote_endpoint, self.local_endpoint, self.reqid),
                Policy(in_sel, "fwd", self.remote_endpoint, self.local_endpoint, self.reqid))


# --- the kernel side (worker threads) ---------------------------------------------------------------

def probe() -> str | None:
    """None when this kernel can build ESP tunnels with our algorithm. States are added and
    removed again in a documentation address range (modules load on demand): first with
    cbc(aes)+hmac(sha256), which every kernel's crypto has, so that a refusal means no ESP;
    then with our AEAD."""
    spi = secrets.randbelow(2**31) + 2**31
    esp = State("192.0.2.254", "192.0.2.255", spi, 0, crypt=Algorithm("cbc(aes)", secrets.token_bytes(16)),
                auth=Algorithm("hmac(sha256)", secrets.token_bytes(32), trunc_bits=128))
    try:
        with Xfrm() as x:
            for state in (esp, dataclasses.replace(esp, crypt=None, auth=None, aead=gcm_aes(new_key()))):
                x.add_state(state)
                x.delete_state(state.dst, spi)
        return None
    except OSError as e:
        if esp_missing(e):
            return "this kernel has no ESP (the esp4/esp6 module is missing)"
        if algorithm_missing(e):
            return "this kernel lacks rfc4106(gcm(aes)) for ESP (a crypto module is missing)"
        return f"cannot use xfrm here: {e.strerror or e}"


def apply(half: Half, force: bool = False) -> None:
    """Make the kernel carry `half`: its two SAs (older SAs of the same tunnel go: a rekey),
    its policies, the overlay address on lo and the route to the far overlay address."""
    out, in_ = half.states()
    with Xfrm() as x:
        have = {(s.state.dst, s.state.spi): s.state for s in x.states() if s.state.reqid == half.reqid}
        for state in (in_, out):  # the inbound SA first: the peer may already send with it
            old = have.pop((state.dst, state.spi), None)
            if old is not None and old != state:
                # XFRM_MSG_UPDSA changes an SA's encapsulation and lifetimes, never its keys or
                # algorithms: an SA that differs is replaced.
                x.delete_state(old.dst, old.spi)
                old = None
            if old is None or force:
                x.add_state(state, update=old is not None)
        for state in have.values():
            with contextlib.suppress(OSError):
                x.delete_state(state.dst, state.spi)
        current = {(p.sel, p.dir): p for p in x.policies()}
        for policy in half.policies():
            if current.get((policy.sel, policy.dir)) != policy:
                x.add_policy(policy, update=(policy.sel, policy.dir) in current)
    iface.add_local(half.local_ip)
    iface.route_via_underlay(half.remote_ip, half.local_ip, half.remote_endpoint)


def counters(half: Half) -> tuple[int, int] | None:
    """(bytes received, bytes sent) through the SAs, or None when they are not all there."""
    out, in_ = half.states()
    with Xfrm() as x:
        found = {(s.state.dst, s.state.spi): s for s in x.states() if s.state.reqid == half.reqid}
    if (out.dst, out.spi) not in found or (in_.dst, in_.spi) not in found:
        return None
    return found[(in_.dst, in_.spi)].bytes, found[(out.dst, out.spi)].bytes


def remove(reqid: int, local_ip: str | None = None, remote_ip: str | None = None) -> None:
    """Every SA and policy of this reqid, and (when given) the overlay route and address."""
    with Xfrm() as x:
        for s in x.states():
            if s.state.reqid == reqid:
                with contextlib.suppress(OSError):
                    x.delete_state(s.state.dst, s.state.spi)
        for p in x.policies():
            if p.reqid == reqid:
                with contextlib.suppress(OSError):
                    x.delete_policy(p.sel, p.dir)
    if remote_ip:
        iface.delete_route(remote_ip)
    if local_ip:
        iface.delete_local(local_ip)


def stray_reqids(known: Iterable[int]) -> set[int]:
    """Reqids of our range in the kernel that no record knows (a crash left them)."""
    with Xfrm() as x:
        found = {s.state.reqid for s in x.states()} | {p.reqid for p in x.policies()}
    return {r for r in found if ours(r)} - set(known)


def encap_socket(port: int) -> socket.socket:
    """The UDP socket that takes ESP-in-UDP on `port` into the kernel's xfrm input."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr = ("::", port)
    except OSError:
        s, addr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("0.0.0.0", port)
    try:
        s.setsockopt(socket.SOL_UDP, UDP_ENCAP, UDP_ENCAP_ESPINUDP)
        s.bind(addr)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise IpsecError(f"UDP port {port} for ESP-in-UDP is taken") from None
        raise IpsecError(f"cannot hold UDP port {port} for ESP-in-UDP: {e.strerror}") from None
    return s


async def run(fn, *args):
    """fn(*args) on a worker thread (pyroute2 runs its own event loop); kernel refusals
    become IpsecError."""
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        if esp_missing(e):
            raise IpsecError("this kernel has no ESP (the esp4/esp6 module is missing)") from None
        raise IpsecError(str(e)) from None
