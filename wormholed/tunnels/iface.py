"""The tunnel's place in the routing: for WireGuard, its interface up with its MTU,
the overlay address on it and a route to the far overlay address through it; for
ipsec (no interface), the overlay address on `lo` and a route to the far overlay
address by the underlay link, with the overlay address as source.

Thin and synchronous (pyroute2's IPRoute runs its own event loop, so callers in
the daemon run these on a worker thread). Each step checks what is there first,
so applying the same settings twice changes nothing."""

from __future__ import annotations

import errno
import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

PREFIX = "wh-"  # every interface wormhole makes for a tunnel; others are never touched


def _bits(ip: str) -> int:
    return ipaddress.ip_address(ip).max_prefixlen


def index_of(ifname: str) -> int | None:
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=ifname)
    return found[0] if found else None


def tunnel_links() -> dict[str, str]:
    """Interfaces named like ours: name -> kind (tun for wireguard-go, wireguard for the kernel's)."""
    with IPRoute() as ip:
        links = {}
        for link in ip.link("dump"):
            name = link.get("ifname")
            if name and name.startswith(PREFIX):
                info = link.get_attr("IFLA_LINKINFO")
                links[name] = info.get_attr("IFLA_INFO_KIND") if info else ""
        return links


def route_mtu(dst: str) -> int:
    """The MTU of the link the route toward dst leaves by."""
    with IPRoute() as ip:
        oif = ip.route("get", dst=dst)[0].get("oif")
        return ip.link("get", index=oif)[0].get("mtu")


def source_toward(dst: str) -> str:
    """The source address this host uses toward dst."""
    with IPRoute() as ip:
        return ip.route("get", dst=dst)[0].get("prefsrc")


def configure(ifname: str, local_ip: str, remote_ip: str, mtu: int) -> None:
    """Up with `mtu`, `local_ip`/32 on it (no other address), a route to `remote_ip` through it."""
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            raise OSError(errno.ENODEV, f"interface {ifname} is gone")
        idx = found[0]
        link = ip.link("get", index=idx)[0]
        if link.get("mtu") != mtu or link.get("state") != "up":
            ip.link("set", index=idx, mtu=mtu, state="up")
        have = {(a.get("address"), a.get("prefixlen")) for a in ip.addr("dump", index=idx)
                if not str(a.get("address", "")).startswith("fe80:")}
        want = (local_ip, _bits(local_ip))
        for addr, prefixlen in have - {want}:
            ip.addr("del", index=idx, address=addr, prefixlen=prefixlen)
        if want not in have:
            ip.addr("add", index=idx, address=local_ip, prefixlen=want[1])
        try:
            ip.route("replace", dst=f"{remote_ip}/{_bits(remote_ip)}", oif=idx, prefsrc=local_ip, scope=253)
        except NetlinkError as e:
            raise OSError(e.code, f"cannot route {remote_ip} through {ifname}: {e}") from None


def delete(ifname: str) -> bool:
    """Remove the interface; False when there was none."""
    with IPRoute() as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ip.link("del", index=found[0])
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise
            return False
        return True


def add_local(ip: str) -> None:
    """ip/32 (/128) on lo, unless it is there."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        if not any(a.get("address") == ip for a in ipr.addr("dump", index=lo)):
            ipr.addr("add", index=lo, address=ip, prefixlen=_bits(ip))


def delete_local(ip: str) -> None:
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        try:
            ipr.addr("del", index=lo, address=ip, prefixlen=_bits(ip))
        except NetlinkError as e:
            if e.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                raise


def route_via_underlay(dst: str, src: str, endpoint: str) -> None:
    """dst/32 leaves as the route toward endpoint does (same link, same gateway), from src."""
    with IPRoute() as ipr:
        way = ipr.route("get", dst=endpoint)[0]
        kw = {"oif": way.get("oif"), "prefsrc": src}
        gateway = way.get("gateway")
        if gateway and ipaddress.ip_address(gateway).version == ipaddress.ip_address(dst).version:
            kw["gateway"] = gateway
        try:
            ipr.route("replace", dst=f"{dst}/{_bits(dst)}", **kw)
        except NetlinkError as e:
            raise OSError(e.code, f"cannot route {dst} toward {endpoint}: {e}") from None


def delete_route(dst: str) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("del", dst=f"{dst}/{_bits(dst)}")
        except NetlinkError as e:
            if e.code not in (errno.ESRCH, errno.ENOENT):
                raise
