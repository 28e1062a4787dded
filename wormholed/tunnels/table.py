"""The daemon's table of tunnels: build, reuse, repair and remove them, with the peer.

A tunnel joins this daemon and one peer daemon (one tunnel per peer, named by
the peer's lasting daemon id). The daemon that is asked (`tunnel-create HOST`,
or a `tunnel HOST` wormhole) leads; the peer builds its half when told:

    lead                                   peer
    tunnel-hello {daemon_id, type}   ->    its id, the address to send to, the overlay
                                           addresses it uses, its half of our tunnel if it
                                           kept one, and whether it can build the type
    (pick the pair and a port; keys)
    tunnel-build {pair, key, port}   ->    builds or updates its half; its public key and port
    (build our half; if that fails, tunnel-destroy the peer's half when it was new)

Every step is idempotent: asking again for a tunnel that is whole changes
nothing, and a tunnel whose peer lost its half (rebooted) is rebuilt the same
way. Private keys never leave their host; the preshared key is derived from
key.secret on both ends. A record per tunnel (STATE/tunnels/PEER.json) is
written before the interface is built, so a daemon that dies halfway finds
it at the next start: `rediscover` keeps what is whole, rebuilds a half whose
interface or wireguard-go is gone from its record (same keys and port, so the
peer needs no change), and removes tunnel interfaces nobody recorded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import random
import socket
from dataclasses import dataclass

from wormhole.addr import Address, AddressError
from wormhole.spec import hostport

from ..errors import Busy, DaemonError, Failed, Refused
from ..peers import Peers
from ..state import RecordDir
from .drivers import IpsecDriver, WireguardDriver
from .ipam import AllocationError, allocate_pair, interface_name, overlay_network, port_candidates
from .record import TYPES, Tunnel

log = logging.getLogger("wormholed")
MONITOR_PERIOD = 10.0
BUSY_WAIT = 40.0  # how long a follower asks again while the leader builds: longer than a build
                 # (wireguard-go's 10 s start, peer calls of up to 5 s each) on a loaded host


@dataclass(frozen=True)
class Settings:
    cidr: str = "100.64.0.0/14"
    ports: tuple[int, int] = (4500, 4599)
    internal_ip: str | None = None  # -I
    external_ip: str | None = None  # -E
    default_type: str = "wireguard"
    wireguard_go: str | None = None


def _udp_port_free(port: int) -> bool:
    """Nothing holds UDP `port` on any address (IPv4 or IPv6) of this namespace."""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr = ("::", port)
    except OSError:  # no IPv6 here
        s, addr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("0.0.0.0", port)
    with s:
        try:
            s.bind(addr)
            return True
        except OSError:
            return False


def _same_kind(old: Tunnel, kind: str, udp: bool, host: str) -> None:
    if old.type != kind:
        raise Refused(f"a {old.type} tunnel to {host} exists: delete it first to make a {kind} one")
    if kind == "ipsec" and bool(old.local_port) != udp:
        raise Refused(f"the ipsec tunnel to {host} is {'' if old.local_port else 'not '}UDP-encapsulated: "
                      f"delete it first to change that")


def _display(ip: str) -> str:
    """A peer's underlay address as a daemon address the CLI reads back."""
    return f"[{ip}]" if ":" in ip else ip


def _same_peer(a: str, b: str) -> bool:
    try:
        return Address.parse(a) == Address.parse(b)
    except AddressError:
        return a == b


def _answer(res, host: str, name: str, kind: type):
    value = res.get(name) if isinstance(res, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Failed(f"{host}: bad answer from its daemon ({name!r} missing or wrong)")
    return value


class Tunnels:
    def __init__(self, records: RecordDir, peers: Peers, secret: bytes, daemon_id: str, settings: Settings):
        self._records, self._peers, self._secret, self._id, self._s = records, peers, secret, daemon_id, settings
        self._tunnels: dict[str, Tunnel] = {}  # peer daemon id -> this host's half
        self._drafts: dict[str, Tunnel] = {}  # halves being negotiated: their addresses and ports are taken
        self._users: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        # far halves still to remove: deleted here while their peer was down
        self._gone = RecordDir(f"{records.path}-deleted")
        self._drivers = {"wireguard": WireguardDriver(secret, daemon_id, settings.wireguard_go),
                         "ipsec": IpsecDriver()}
        self._net = overlay_network(settings.cidr)

    # --- lookups ---------------------------------------------------------------------------

    def local_ip(self, peer_id: str) -> str | None:
        t = self._tunnels.get(peer_id)
        return t.local_ip if t else None

    def _find(self, host: str) -> Tunnel | None:
        for t in self._tunnels.values():
            if _same_peer(t.host, host):
                return t
        with contextlib.suppress(AddressError):
            ip = Address.parse(host).host
            return next((t for t in self._tunnels.values() if t.remote_endpoint == ip), None)
        return None

    def use(self, peer_id: str, wormhole_id: str):
        """Count wormhole_id as a user of the tunnel to peer_id; call the result to stop."""
        self._users[peer_id][wormhole_id] += 1

        def release():
            self._users[peer_id][wormhole_id] -= 1
            if self._users[peer_id][wormhole_id] <= 0:
                del self._users[peer_id][wormhole_id]
        return release

    def users_of(self, host: str) -> set[str]:
        t = self._find(host)
        return set(self._users.get(t.peer_id, ())) if t else set()

    def _taken(self) -> list[Tunnel]:
        return [*self._tunnels.values(), *self._drafts.values()]

    def _used_ips(self, but: str | None = None) -> set[str]:
        return {ip for t in self._taken() if t.peer_id != but for ip in (t.local_ip, t.remote_ip)}

    # --- building blocks -------------------------------------------------------------------

    async def _driver(self, kind: str):
        """The driver of `kind`, if this host can build it; else Failed saying why."""
        if kind not in TYPES:
            raise Refused(f"unknown tunnel type {kind!r}: use wireguard or ipsec")
        driver = self._drivers[kind]
        missing = await driver.unavailable()
        if missing:
            raise Failed(f"cannot build {kind} tunnels here: {missing}")
        return driver

    async def _free_port(self) -> int:
        """A port of -P that no tunnel here uses and that nothing else holds right now."""
        lo, hi = self._s.ports
        try:
            candidates = port_candidates(lo, hi, {t.local_port for t in self._taken()})
        except AllocationError as e:
            raise Refused(str(e)) from None
        for port in candidates:
            if _udp_port_free(port):
                return port
        raise Refused(f"no free UDP port in {lo}-{hi}: every one is in use on this host")

    def _endpoint(self, facing: str | None) -> str:
        ip = self._s.external_ip or self._s.internal_ip or facing
        if not ip:
            raise Failed("cannot tell which address peers reach this host at: give -E or -I")
        return ip

    async def _apply(self, t: Tunnel, force: bool = False) -> None:
        """Make the system carry t (a no-op when it does)."""
        await self._drivers[t.type].apply(t, force)

    async def _install(self, t: Tunnel, old: Tunnel | None) -> None:
        """Record t, then build it; a new tunnel that fails is removed again."""
        self._tunnels[t.peer_id] = t
        self._records.save(t.peer_id, dataclasses.asdict(t))
        try:
            await self._apply(t, force=old is not None and old != t)  # e.g. the peer moved: set it even so
        except BaseException:
            if old is None:
                await self._teardown(t)
            raise

    async def _teardown(self, t: Tunnel) -> None:
        self._tunnels.pop(t.peer_id, None)
        try:
            await self._drivers[t.type].remove(t)
        finally:
            self._records.remove(t.peer_id)

    # --- what the CLI asks for ---------------------------------------------------------------

    async def ensure(self, host: str, *, kind: str | None = None, udp: bool = False, rekey: bool = False) -> Tunnel:
        """The tunnel to host's daemon: reused when whole, else built or repaired on both ends.
        `udp`: ESP-in-UDP for ipsec (WireGuard is UDP already); `rekey`: new ipsec keys and
        SPIs on both ends of a live tunnel (WireGuard rotates its session keys by itself).

        When both ends lead at once, the one with the smaller daemon id goes on and the
        other is told it is busy (tunnel-build): it waits, then asks again and finds the
        tunnel built."""
        kind = kind or self._s.default_type
        Peers.address(host)  # a bad address is refused before anything else
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_WAIT
        while True:
            try:
                return await self._ensure(host, kind, udp, rekey)
            except Busy:
                if loop.time() >= deadline:
                    raise Failed(f"{host} kept building the same tunnel from its end; try again") from None
                await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _ensure(self, host: str, kind: str, udp: bool, rekey: bool) -> Tunnel:
        driver = await self._driver(kind)  # what this host cannot build, the peer never builds
        async with self._peers.session(host) as s:
            hello = await s.call("tunnel-hello", {"daemon_id": self._id, "type": kind})
            peer_id = _answer(hello, host, "daemon_id", str)
            if peer_id == self._id:
                raise Refused(f"{host} is this daemon: a tunnel needs another host")
            async with self._locks[peer_id]:  # held to the end: one build at a time per peer
                hello = await s.call("tunnel-hello", {"daemon_id": self._id, "type": kind})  # fresh, locked
                if hello.get("unavailable"):
                    raise Failed(f"{host} cannot build this tunnel: {hello['unavailable']}")
                stale = self._find(host)
                if stale is not None and stale.peer_id != peer_id:
                    log.warning("tunnel to %s: its daemon is a new one (state lost); removing %s, the old "
                                "tunnel to it", host, stale.ifname or f"ipsec reqid {stale.reqid:#x}")
                    async with self._locks[stale.peer_id]:
                        await self._teardown(stale)
                self._gone.remove(peer_id)  # wanted again: its far half is not to be removed
                draft, old = await self._draft(host, peer_id, hello, driver, kind, udp, rekey,
                                               self._endpoint(s.local_ip))
                far_was = hello.get("tunnel")
                built_far = False
                try:
                    far = await s.call("tunnel-build", {
                        "daemon_id": self._id, "type": kind, "udp": udp, "rekey": rekey,
                        "local_ip": draft.remote_ip, "remote_ip": draft.local_ip, "offer": driver.offer(draft),
                        "endpoint": draft.local_endpoint, "port": draft.local_port})
                    built_far = True
                    t = driver.take(dataclasses.replace(
                        draft, remote_port=_answer(far, host, "port", int),
                        remote_endpoint=_answer(far, host, "endpoint", str)), far.get("offer"))
                    try:
                        Tunnel.from_record(dataclasses.asdict(t))
                    except ValueError as e:
                        raise Failed(f"{host}: bad answer from its daemon ({e})") from None
                    await self._install(t, old)
                except BaseException:
                    if built_far and far_was is None:
                        with contextlib.suppress(DaemonError):
                            await s.call("tunnel-destroy", {"daemon_id": self._id})
                    raise
                finally:
                    self._drafts.pop(peer_id, None)
        if old is None or old != t:
            log.info("tunnel to %s: %s <-> %s, %s (%s)%s", host, t.local_ip, t.remote_ip, t.type,
                     t.ifname or t.backend, " rekeyed" if rekey and old else "")
        return t

    async def _draft(self, host, peer_id, hello, driver, kind, udp, rekey, endpoint) -> tuple[Tunnel, Tunnel | None]:
        """This end's half before the peer answers: the pair, port and secrets it keeps, or new
        ones. A new draft is entered at once, so that no other tunnel takes its addresses."""
        old = self._tunnels.get(peer_id)
        remote_endpoint = _answer(hello, host, "endpoint", str)
        if old is not None:
            _same_kind(old, kind, udp, host)
            t = dataclasses.replace(old, host=host, local_endpoint=endpoint, remote_endpoint=remote_endpoint)
            return (driver.rekeyed(t, self._taken()) if rekey else t), old
        far = hello.get("tunnel") if isinstance(hello.get("tunnel"), dict) else None
        used = self._used_ips() | set(_answer(hello, host, "used", list))
        if far and {far.get("local_ip"), far.get("remote_ip")}.isdisjoint(self._used_ips()) \
                and all(ipaddress.ip_address(far[k]) in self._net for k in ("local_ip", "remote_ip")):
            local_ip, remote_ip = far["remote_ip"], far["local_ip"]  # the pair the peer kept
        else:
            try:
                local_ip, remote_ip = allocate_pair(str(self._net), used)
            except AllocationError as e:
                raise Refused(str(e)) from None
        wireguard = kind == "wireguard"
        port = await self._free_port() if wireguard or udp else 0
        draft = driver.fresh(Tunnel(peer_id, host, kind, await driver.backend(),
                                    interface_name(peer_id) if wireguard else "", local_ip, remote_ip,
                                    endpoint, port, remote_endpoint, 0), self._taken())
        self._drafts[peer_id] = draft
        return draft, None

    async def delete(self, host: str) -> list[str]:
        """Remove both halves; warnings say what could not be reached."""
        t = self._find(host)
        warnings = []
        try:
            res = await self._peers.call(host, "tunnel-destroy", {"daemon_id": self._id})
        except DaemonError as e:
            if t is None:
                raise
            warnings.append(f"the far half of the tunnel on {host} could not be removed now ({e}); "
                            f"this daemon removes it when {host} answers again")
            log.warning("tunnel to %s: %s", host, warnings[-1])
            self._gone.ensure()
            self._gone.save(t.peer_id, {"peer_id": t.peer_id, "host": host})
            res = {}
        if t is None and not (isinstance(res, dict) and res.get("removed")):
            raise Refused(f"no tunnel to {host}")
        if t is not None:
            async with self._locks[t.peer_id]:
                await self._teardown(t)
            log.info("tunnel to %s: deleted (%s)", host, t.ifname or t.type)
        return warnings

    async def list(self) -> list[dict]:
        rows = []
        for t in list(self._tunnels.values()):
            status = await self._drivers[t.type].status(t)
            row = {
                "peer": t.host, "peer_id": t.peer_id, "type": t.type, "backend": t.backend,
                "interface": t.ifname, "local_ip": t.local_ip, "remote_ip": t.remote_ip,
                "local_endpoint": hostport(t.local_endpoint, t.local_port) if t.local_port else t.local_endpoint,
                "remote_endpoint": hostport(t.remote_endpoint, t.remote_port) if t.remote_port else t.remote_endpoint,
                "latest_handshake": status.latest_handshake if status else None,
                "rx_bytes": status.rx_bytes if status else 0, "tx_bytes": status.tx_bytes if status else 0,
                "users": sorted(self._users.get(t.peer_id, ())), "state": "up" if status else "down",
            }
            if t.type == "ipsec":
                row.update(spi_in=f"{t.spi_in:#010x}", spi_out=f"{t.spi_out:#010x}", reqid=t.reqid,
                           udp=bool(t.local_port))
            rows.append(row)
        return rows

    # --- what the peer asks for ---------------------------------------------------------------

    async def hello(self, daemon_id: str, kind: str | None, facing: str) -> dict:
        unavailable = None
        try:
            await self._driver(kind or self._s.default_type)
        except DaemonError as e:
            unavailable = str(e)
        t = self._tunnels.get(daemon_id)
        return {"daemon_id": self._id, "endpoint": self._endpoint(facing), "used": sorted(self._used_ips()),
                "tunnel": {"local_ip": t.local_ip, "remote_ip": t.remote_ip, "type": t.type} if t else None,
                "unavailable": unavailable}

    async def build_far(self, params: dict, facing: str, caller: str) -> dict:
        """Build or update this host's half of the caller's tunnel, as the caller drafted it."""
        def field(name, kind):
            value = params.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise Refused(f"tunnel-build: parameter {name!r} missing or wrong")
            return value
        peer_id, kind = field("daemon_id", str), field("type", str)
        local_ip, remote_ip = field("local_ip", str), field("remote_ip", str)
        udp, rekey = bool(params.get("udp")), bool(params.get("rekey"))
        try:
            if not all(ipaddress.ip_address(ip) in self._net for ip in (local_ip, remote_ip)):
                raise Refused(f"overlay pair {local_ip}/{remote_ip} is outside this host's overlay network "
                              f"{self._net}: give every daemon the same -C")
            ipaddress.ip_address(field("endpoint", str))
        except ValueError as e:
            raise Refused(f"tunnel-build: {e}") from None
        driver = await self._driver(kind)
        lock = self._locks[peer_id]
        if lock.locked() and self._id < peer_id:
            raise Busy("building the tunnel to you from this end")  # we lead; the caller asks again
        async with lock:
            old = self._tunnels.get(peer_id)
            if not {local_ip, remote_ip}.isdisjoint(self._used_ips(but=peer_id)):
                raise Refused(f"overlay pair {local_ip}/{remote_ip} clashes with another tunnel on this host")
            far = dict(local_ip=local_ip, remote_ip=remote_ip, local_endpoint=self._endpoint(facing),
                       remote_endpoint=params["endpoint"], remote_port=field("port", int))
            if old is not None:
                _same_kind(old, kind, udp, old.host)
                t = dataclasses.replace(old, **far)
                t = driver.rekeyed(t, self._taken()) if rekey else t
            else:
                port = await self._free_port() if kind == "wireguard" or udp else 0
                t = driver.fresh(Tunnel(peer_id, _display(caller), kind, await driver.backend(),
                                        interface_name(peer_id) if kind == "wireguard" else "",
                                        local_port=port, **far), self._taken())
            t = driver.take(t, params.get("offer"))
            await self._install(t, old)
        if old != t:
            log.info("tunnel to %s: far half %s <-> %s, %s (%s)", t.host, local_ip, remote_ip, t.type,
                     t.ifname or t.backend)
        return {"offer": driver.offer(t), "port": t.local_port, "endpoint": t.local_endpoint}

    async def destroy_far(self, peer_id: str) -> dict:
        t = self._tunnels.get(peer_id)
        if t is None:
            return {"removed": False}
        async with self._locks[peer_id]:
            await self._teardown(t)
        log.info("tunnel to %s: deleted at its request (%s)", t.host, t.ifname or t.type)
        return {"removed": True}

    # --- start and upkeep --------------------------------------------------------------------

    async def rediscover(self) -> None:
        """Adopt what an earlier run left: keep whole tunnels, rebuild broken halves from their
        records, remove what tunnels left without a record (interfaces, ipsec states)."""
        for record in self._records.load():
            try:
                t = Tunnel.from_record(record)
            except (ValueError, TypeError) as e:
                log.error("skipping tunnel record %s: %s", record.get("peer_id", "?"), e)
                continue
            self._tunnels[t.peer_id] = t
        for driver in self._drivers.values():
            for name in await driver.strays(list(self._tunnels.values())):
                log.warning("removed %s: no record of it (left by a crash)", name)
        for t in list(self._tunnels.values()):
            await self._check(t, "found")

    async def _check(self, t: Tunnel, verb: str) -> None:
        what = t.ifname or f"its ipsec states (reqid {t.reqid:#x})"
        async with self._locks[t.peer_id]:
            if self._tunnels.get(t.peer_id) is not t:
                return  # deleted or replaced meanwhile
            alive = await self._drivers[t.type].status(t) is not None
            try:
                await self._apply(t)
            except DaemonError as e:
                log.error("tunnel to %s: %s could not be repaired: %s", t.host, what, e)
                return
        if not alive:
            log.warning("repaired tunnel to %s: rebuilt %s from its record (it was gone)", t.host, what)
        elif verb == "found":
            log.info("tunnel to %s: found %s up (%s)", t.host, what, t.backend)

    async def monitor(self, period: float = MONITOR_PERIOD) -> None:
        """Rebuild halves that vanish while the daemon runs (a killed wireguard-go), and remove
        the far halves of tunnels deleted while their peer was down, once it answers."""
        while True:
            await asyncio.sleep(period)
            for t in list(self._tunnels.values()):
                if await self._drivers[t.type].status(t) is None:
                    await self._check(t, "repair")
            for gone in self._gone.load():
                await self._destroy_far_half(gone)

    def close(self) -> None:
        """What the daemon holds for its tunnels (ESP-in-UDP sockets) goes; the tunnels stay."""
        self._drivers["ipsec"].close()

    async def _destroy_far_half(self, gone: dict) -> None:
        peer_id, host = gone.get("peer_id"), gone.get("host")
        if not isinstance(peer_id, str) or not isinstance(host, str) or peer_id in self._tunnels:
            self._gone.remove(str(peer_id))
            return
        try:
            await self._peers.call(host, "tunnel-destroy", {"daemon_id": self._id})
        except DaemonError as e:
            log.debug("tunnel to %s: far half still not removed: %s", host, e)
            return
        self._gone.remove(peer_id)
        log.info("tunnel to %s: removed its far half, deleted here while %s was down", host, host)
