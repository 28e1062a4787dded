"""WireGuard backends: the kernel module (through pyroute2's generic netlink) and
wireguard-go (userspace, configured over its UAPI socket). Both have the same
small interface, so the tunnel table never asks which one runs:

    unavailable() -> str | None     why this host cannot use it (None: it can)
    await up(ifname, cfg, force)    the interface exists and carries cfg; a no-op when it
                                    already does (force: set even so, e.g. a new endpoint)
    await status(ifname)            its DeviceStatus, or None when it is not running
    await down(ifname)              gone, with whatever ran it

wireguard-go is started detached, in a session of its own, so that it outlives
the daemon (tunnels are not torn down when wormholed stops, restarts or
crashes): it daemonizes itself once its interface and UAPI socket
(/run/wireguard/IFACE.sock) exist. Deleting the interface makes it exit; when it
dies the kernel removes the interface, and its socket file stays behind, stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
from typing import Protocol

from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from . import iface
from .wgconf import DeviceStatus, UapiError, WgConfig, kernel_remove_args, kernel_set_args, parse_kernel_info, \
    parse_uapi_get, parse_uapi_reply, uapi_set

log = logging.getLogger("wormholed")
UAPI_DIR = "/run/wireguard"
START_TIMEOUT = 10.0


class BackendError(Exception):
    """The backend could not do it; the message is fit for the user."""


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None: ...
    async def up(self, ifname: str, cfg: WgConfig, force: bool = False) -> None: ...
    async def status(self, ifname: str) -> DeviceStatus | None: ...
    async def down(self, ifname: str) -> None: ...


def same(status: DeviceStatus | None, cfg: WgConfig) -> bool:
    """The device already carries cfg (the endpoint aside: WireGuard updates it as the peer roams)."""
    if status is None or len(status.peers) != 1:
        return False
    peer, want = status.peers[0], cfg.peer
    return (status.private_key == cfg.private_key and status.listen_port == cfg.listen_port
            and peer.public_key == want.public_key and peer.preshared_key == want.preshared_key
            and peer.keepalive == want.keepalive and set(peer.allowed_ips) == set(want.allowed_ips))


class WireguardGo:
    name = "wireguard-go"

    def __init__(self, path: str | None = None):
        self._given = path
        self.path = path or shutil.which("wireguard-go") or "wireguard-go"

    def unavailable(self) -> str | None:
        if os.path.isfile(self.path) and os.access(self.path, os.X_OK):
            return None
        if self._given is None:
            return "wireguard-go is not installed (not found on PATH)"
        return f"wireguard-go not found at {self.path}"

    @staticmethod
    def socket_path(ifname: str) -> str:
        return os.path.join(UAPI_DIR, f"{ifname}.sock")

    async def _request(self, ifname: str, request: bytes) -> str:
        reader, writer = await asyncio.open_unix_connection(self.socket_path(ifname))
        try:
            writer.write(request)
            await writer.drain()
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = await asyncio.wait_for(reader.read(1 << 16), 5)
                if not chunk:
                    raise BackendError(f"wireguard-go of {ifname} closed its UAPI socket")
                reply += chunk
            return reply.decode()
        finally:
            writer.close()

    async def status(self, ifname: str) -> DeviceStatus | None:
        try:
            return parse_uapi_get(await self._request(ifname, b"get=1\n\n"))
        except (OSError, TimeoutError, BackendError):
            return None

    async def _start(self, ifname: str) -> None:
        await self.down(ifname)  # the remains of a dead one: its interface, its socket file
        os.makedirs(UAPI_DIR, mode=0o755, exist_ok=True)
        # Its stderr goes to a file, not a pipe: the daemonized child keeps it open.
        with tempfile.TemporaryFile() as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.path, ifname, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=err, start_new_session=True)
            except OSError as e:
                raise BackendError(f"cannot run {self.path}: {e.strerror or e}") from None
            try:
                await asyncio.wait_for(proc.wait(), START_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise BackendError(f"wireguard-go did not start {ifname} within {START_TIMEOUT:g} s") from None
            err.seek(0)
            text = err.read(1 << 16).decode(errors="replace")
        if proc.returncode != 0:
            lines = [ln for ln in text.splitlines() if ln.strip() and "│" not in ln]
            raise BackendError(f"wireguard-go could not create {ifname} (exit {proc.returncode})"
                               + (f": {lines[-1].strip()}" if lines else ""))
        log.info("tunnel interface %s: wireguard-go started", ifname)

    async def up(self, ifname: str, cfg: WgConfig, force: bool = False) -> None:
        status = await self.status(ifname)
        if status is None:
            await self._start(ifname)
        elif same(status, cfg) and not force:
            return
        try:
            parse_uapi_reply(await self._request(ifname, uapi_set(cfg)))
        except (OSError, TimeoutError, UapiError) as e:
            raise BackendError(f"cannot configure {ifname} through wireguard-go: {e}") from None

    async def down(self, ifname: str) -> None:
        await asyncio.to_thread(iface.delete, ifname)  # wireguard-go exits when its interface goes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path(ifname))


class KernelWireguard:
    name = "kernel"

    def __init__(self):
        self._missing: str | None | bool = False  # False: not probed yet

    def unavailable(self) -> str | None:
        if self._missing is False:
            self._missing = _probe_kernel()
        return self._missing

    def _up(self, ifname: str, cfg: WgConfig, force: bool) -> None:
        with IPRoute() as ip:
            if not ip.link_lookup(ifname=ifname):
                ip.link("add", ifname=ifname, kind="wireguard")
                log.info("tunnel interface %s: kernel WireGuard", ifname)
        with WireGuard() as wg:
            status = parse_kernel_info(wg.info(ifname))
            if same(status, cfg) and not force:
                return
            wg.set(ifname, **kernel_set_args(cfg))
            for args in kernel_remove_args(status, cfg):
                wg.set(ifname, **args)

    async def up(self, ifname: str, cfg: WgConfig, force: bool = False) -> None:
        try:
            await asyncio.to_thread(self._up, ifname, cfg, force)
        except NetlinkError as e:
            raise BackendError(f"cannot configure {ifname} through kernel WireGuard: {os.strerror(e.code)}") from None

    def _status(self, ifname: str) -> DeviceStatus | None:
        if iface.index_of(ifname) is None:
            return None
        with WireGuard() as wg:
            return parse_kernel_info(wg.info(ifname))

    async def status(self, ifname: str) -> DeviceStatus | None:
        try:
            return await asyncio.to_thread(self._status, ifname)
        except (NetlinkError, ValueError):
            return None

    async def down(self, ifname: str) -> None:
        await asyncio.to_thread(iface.delete, ifname)


def _probe_kernel() -> str | None:
    """None when this kernel can make WireGuard interfaces (the module loads on demand)."""
    name = f"wh-probe{os.getpid() % 10000}"
    try:
        with IPRoute() as ip:
            ip.link("add", ifname=name, kind="wireguard")
            ip.link("del", index=ip.link_lookup(ifname=name)[0])
        return None
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            return None
        return f"no WireGuard in this kernel ({os.strerror(e.code)})"
    except OSError as e:
        return f"no WireGuard in this kernel ({e.strerror or e})"


def choose(kernel: KernelWireguard, userspace: WireguardGo) -> Backend:
    """The kernel's WireGuard where it exists, else wireguard-go; BackendError when neither."""
    kernel_missing = kernel.unavailable()
    if kernel_missing is None:
        return kernel
    go_missing = userspace.unavailable()
    if go_missing is None:
        return userspace
    raise BackendError(f"cannot build WireGuard tunnels here: {kernel_missing}, and {go_missing}")
