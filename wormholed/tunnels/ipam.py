"""Picks what two tunnel ends must agree on: overlay addresses, UDP ports, interface names.

Pure functions over "what is already taken", so the daemon can ask again after
any restart and tests need no network. Addresses come in adjacent pairs
(offsets 2k, 2k+1) so one tunnel never straddles two others. Networks may be
huge (an IPv6 /64), so nothing here enumerates a network: a few random tries
find a free pair when there is room, and only when they fail does a scan walk
from a random start, which ends within as many steps as there are used pairs.
Exhaustion is decided by counting, so it is exact for any size."""

from __future__ import annotations

import hashlib
import ipaddress
import random
import socket
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
RANDOM_TRIES = 64
WIREGUARD_OVERHEAD = 80  # IPv6 40 + UDP 8 + WireGuard 32, as wg-quick reserves
MIN_MTU = 576


class AllocationError(Exception):
    """Nothing free; the message is fit for the user."""


def overlay_network(cidr: str) -> Network:
    """The network CIDR names, host bits allowed ("100.64.1.7/14" is 100.64.0.0/14)."""
    try:
        return ipaddress.ip_network(cidr.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid overlay network {cidr!r}: expected a CIDR such as 100.64.0.0/14") from None


def _address(text: str) -> tuple[int, int]:
    """(version, integer) of "100.64.0.2" or "100.64.0.2/32"; inet_pton, as ipaddress is slow in bulk."""
    host = text.split("/", 1)[0].strip()
    family, version = (socket.AF_INET6, 6) if ":" in host else (socket.AF_INET, 4)
    try:
        return version, int.from_bytes(socket.inet_pton(family, host))
    except OSError:
        raise ValueError(f"invalid overlay address {text!r} in use") from None


def _used_pairs(net: Network, used: Iterable[str]) -> set[int]:
    """Pair indexes (offset // 2) holding any used address inside net; others are ignored."""
    base, last, pairs = int(net.network_address), int(net.broadcast_address), set()
    for text in used:
        version, ip = _address(text)
        if version == net.version and base <= ip <= last:
            pairs.add((ip - base) // 2)
    return pairs


def _free_pair(npairs: int, taken: set[int], rng: random.Random) -> int:
    for _ in range(RANDOM_TRIES):
        k = rng.randrange(npairs)
        if k not in taken:
            return k
    start = rng.randrange(npairs)  # the walk stops at the first hole: at most len(taken) steps
    return next((start + i) % npairs for i in range(npairs) if (start + i) % npairs not in taken)


def allocate_pair(cidr: str, used: Iterable[str], rng: random.Random | None = None) -> tuple[str, str]:
    """A random free pair of adjacent addresses of the network, neither in used."""
    net = overlay_network(cidr)
    npairs = net.num_addresses // 2
    if npairs == 0:
        raise AllocationError(f"overlay network {net} is too small for an address pair (use a /31 or larger)")
    taken = _used_pairs(net, used)
    if len(taken) >= npairs:
        held = "its only pair is" if npairs == 1 else f"all {npairs} pairs are"
        raise AllocationError(f"overlay network {net} has no free address pair ({held} in use)")
    first = net.network_address + 2 * _free_pair(npairs, taken, rng or random.Random())
    return str(first), str(first + 1)


def port_candidates(lo: int, hi: int, used: Iterable[int], rng: random.Random | None = None) -> list[int]:
    """The ports of lo..hi not in used, in random order: the caller binds each in turn."""
    if not 1 <= lo <= hi <= 65535:
        raise ValueError(f"invalid UDP port range {lo}-{hi}")
    taken = set(used)
    ports = [p for p in range(lo, hi + 1) if p not in taken]
    if not ports:
        raise AllocationError(f"no free UDP port in {lo}-{hi} (all {hi - lo + 1} in use by tunnels)")
    (rng or random.Random()).shuffle(ports)
    return ports


def interface_name(peer_id: str) -> str:
    """"wh-" + 10 hex chars of sha256(peer_id): stable across restarts, within IFNAMSIZ (15)."""
    return "wh-" + hashlib.sha256(peer_id.encode()).hexdigest()[:10]


def tunnel_id(a: str, b: str) -> str:
    """The tunnel between daemons a and b, named the same from either end."""
    return "-".join(sorted((a, b)))


def overlay_mtu(underlay_mtu: int) -> int:
    """The tunnel's MTU over an underlay path of underlay_mtu (room for WireGuard over IPv6)."""
    mtu = underlay_mtu - WIREGUARD_OVERHEAD
    if mtu < MIN_MTU:
        raise ValueError(f"underlay MTU {underlay_mtu} leaves {mtu} bytes for the tunnel, below the minimum {MIN_MTU}")
    return mtu
