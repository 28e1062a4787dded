"""Tunnel drivers: one per tunnel type, the same small interface, so the table of
tunnels (table.py) negotiates and builds either kind the same way.

    await unavailable()        why this host cannot build this type (None: it can)
    fresh(t, taken) -> Tunnel  a new half's own secrets (and ids) filled in
    offer(t) -> dict           what the peer must know of this half (sent over TLS-PSK)
    take(t, offer) -> Tunnel   the peer's offer folded into this half
    rekeyed(t, taken)          new secrets for a live half (ipsec; WireGuard rekeys itself)
    await apply(t, force)      the kernel (or wireguard-go) carries t; a no-op when it does
    await status(t)            Status, or None when the half is not running
    await remove(t)            gone
    await strays(known)        remove what this type left without a record; their names

WireGuard offers its public key (the private key never leaves the host);
ipsec offers the SPI and key of the SA the peer will send with, chosen here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import logging
import socket

from ..errors import Failed
from . import iface, ipsec
from .ipam import overlay_mtu
from .record import Status, Tunnel
from .wgconf import b64, from_b64, new_private_key, public_key
from .wireguard import BackendError, KernelWireguard, WireguardGo, choose

log = logging.getLogger("wormholed")


def _offered(offer, name: str, kind: type):
    value = offer.get(name) if isinstance(offer, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Failed(f"the peer's offer lacks {name!r}")
    return value


class WireguardDriver:
    type = "wireguard"

    def __init__(self, secret: bytes, self_id: str, wireguard_go: str | None):
        self._secret, self._id = secret, self_id
        self._kernel, self._go = KernelWireguard(), WireguardGo(wireguard_go)

    def _backend(self, name: str):
        return self._kernel if name == self._kernel.name else self._go

    async def unavailable(self) -> str | None:
        try:
            await asyncio.to_thread(choose, self._kernel, self._go)
            return None
        except BackendError as e:
            return str(e)

    async def backend(self) -> str:
        return (await asyncio.to_thread(choose, self._kernel, self._go)).name

    def fresh(self, t: Tunnel, taken: list[Tunnel]) -> Tunnel:
        return dataclasses.replace(t, private_key=b64(new_private_key()))

    def rekeyed(self, t: Tunnel, taken: list[Tunnel]) -> Tunnel:
        return t  # WireGuard's session keys rotate every two minutes by themselves

    def offer(self, t: Tunnel) -> dict:
        return {"public_key": b64(public_key(from_b64(t.private_key)))}

    def take(self, t: Tunnel, offer: dict) -> Tunnel:
        key = _offered(offer, "public_key", str)
        try:
            from_b64(key)
        except ValueError:
            raise Failed("the peer's public key is not a WireGuard key") from None
        return dataclasses.replace(t, peer_public_key=key)

    async def apply(self, t: Tunnel, force: bool = False) -> None:
        try:
            await self._backend(t.backend).up(t.ifname, t.config(self._secret, self._id), force)
            mtu = overlay_mtu(await asyncio.to_thread(iface.route_mtu, t.remote_endpoint))
            await asyncio.to_thread(iface.configure, t.ifname, t.local_ip, t.remote_ip, mtu)
        except BackendError as e:
            raise Failed(str(e)) from None
        except (OSError, ValueError) as e:
            raise Failed(f"cannot set up tunnel interface {t.ifname}: {getattr(e, 'strerror', None) or e}") from None

    async def status(self, t: Tunnel) -> Status | None:
        status = await self._backend(t.backend).status(t.ifname)
        if status is None:
            return None
        peer = status.peers[0] if status.peers else None
        return Status(peer.rx_bytes, peer.tx_bytes, peer.last_handshake) if peer else Status()

    async def remove(self, t: Tunnel) -> None:
        await self._backend(t.backend).down(t.ifname)

    async def strays(self, known: list[Tunnel]) -> list[str]:
        names = {t.ifname for t in known if t.type == self.type}
        gone = [n for n in await asyncio.to_thread(iface.tunnel_links) if n not in names]
        for name in gone:
            await self._go.down(name)  # removes the link (and so any wireguard-go) and its socket file
        return gone


class IpsecDriver:
    type = "ipsec"

    def __init__(self):
        self._missing: str | None | bool = False  # False: not probed yet
        self._encap: dict[str, socket.socket] = {}  # peer id -> its ESP-in-UDP socket

    async def unavailable(self) -> str | None:
        if self._missing is False:
            self._missing = await asyncio.to_thread(ipsec.probe)
        return self._missing

    async def backend(self) -> str:
        return "xfrm"

    def fresh(self, t: Tunnel, taken: list[Tunnel]) -> Tunnel:
        try:
            reqid = ipsec.new_reqid(x.reqid for x in taken)
        except ipsec.IpsecError as e:
            raise Failed(str(e)) from None
        return self.rekeyed(dataclasses.replace(t, reqid=reqid), taken)

    def rekeyed(self, t: Tunnel, taken: list[Tunnel]) -> Tunnel:
        spi = ipsec.new_spi(x.spi_in for x in taken)
        return dataclasses.replace(t, spi_in=spi, key_in=base64.b64encode(ipsec.new_key()).decode())

    def offer(self, t: Tunnel) -> dict:
        return {"spi": t.spi_in, "key": t.key_in}

    def take(self, t: Tunnel, offer: dict) -> Tunnel:
        spi, key = _offered(offer, "spi", int), _offered(offer, "key", str)
        try:
            raw = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not ipsec.SPI_MIN <= spi < 2**32 or len(raw) != len(ipsec.new_key()):
            raise Failed("the peer offered a bad ipsec SPI or key")
        return dataclasses.replace(t, spi_out=spi, key_out=key)

    async def apply(self, t: Tunnel, force: bool = False) -> None:
        try:
            if t.local_port and t.peer_id not in self._encap:
                self._encap[t.peer_id] = ipsec.encap_socket(t.local_port)
            await ipsec.run(ipsec.apply, t.half(), force)
        except ipsec.IpsecError as e:
            raise Failed(str(e)) from None

    async def status(self, t: Tunnel) -> Status | None:
        try:
            found = await ipsec.run(ipsec.counters, t.half())
        except ipsec.IpsecError:
            return None
        if found is None or (t.local_port and t.peer_id not in self._encap):
            return None
        return Status(*found)

    async def remove(self, t: Tunnel) -> None:
        sock = self._encap.pop(t.peer_id, None)
        if sock is not None:
            sock.close()
        try:
            await ipsec.run(ipsec.remove, t.reqid, t.local_ip, t.remote_ip)
        except ipsec.IpsecError as e:
            raise Failed(str(e)) from None

    async def strays(self, known: list[Tunnel]) -> list[str]:
        if await self.unavailable() is not None:
            return []
        try:
            gone = await ipsec.run(ipsec.stray_reqids, [t.reqid for t in known if t.type == self.type])
            for reqid in gone:
                await ipsec.run(ipsec.remove, reqid)
        except ipsec.IpsecError as e:
            log.warning("could not look for stray ipsec states: %s", e)
            return []
        return [f"ipsec reqid {r:#x}" for r in sorted(gone)]

    def close(self) -> None:
        for sock in self._encap.values():
            sock.close()
        self._encap.clear()
