"""The control server: TLS-PSK connections carrying JSON-RPC lines, methods -> daemon objects.

This is the one place where the daemon's errors become JSON-RPC errors, and
where parameters from the wire are checked before the daemon sees them. The
server owns its connection handlers: `aclose()` cancels the ones still
running (a `create` in progress is rolled back) before the daemon tears its
wormholes down."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from wormhole import protocol
from wormhole.keys import server_context
from wormhole.protocol import RpcError
from wormhole.spec import PROTOS, Context, SpecError, check_limits, check_name

from .errors import DaemonError, Failed, Refused, to_rpc
from .peers import Peers
from .tunnels.table import Tunnels
from .wormholes import Wormholes

log = logging.getLogger("wormholed")
Method = Callable[[dict, "Conn"], Awaitable[object]]
HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Conn:
    """The control connection a request came on."""

    local_ip: str  # our address as the caller reached it: the address that faces the caller
    peer: str


def _conn(writer: asyncio.StreamWriter) -> Conn:
    sockname, peername = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    if not isinstance(sockname, tuple):  # unix socket: the caller is on this host
        return Conn("127.0.0.1", "local")
    return Conn(_unmapped(sockname[0]), _unmapped(peername[0]) if isinstance(peername, tuple) else "?")


def _unmapped(text: str) -> str:
    """An address as the peer knows it: a dual-stack socket reached over IPv4 says ::ffff:a.b.c.d."""
    ip = ipaddress.ip_address(text)
    return str(ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip)


def _str(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise RpcError(protocol.INVALID_PARAMS, f"parameter {name!r} must be a non-empty string")
    return value


def _words(params: dict) -> list[str]:
    words = params.get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise RpcError(protocol.INVALID_PARAMS, "parameter 'words' must be a list of strings")
    try:
        check_limits(tuple(words))
    except SpecError as e:
        raise RpcError(protocol.INVALID_PARAMS, f"parameter 'words': {e}") from None
    return words


def _ip(params: dict, name: str) -> str:
    try:
        return str(ipaddress.ip_address(_str(params, name)))
    except ValueError:
        raise RpcError(protocol.INVALID_PARAMS, f"parameter {name!r} must be an IP address") from None


def methods(wormholes: Wormholes, peers: Peers, tunnels: Tunnels) -> dict[str, Method]:
    async def echo(params, conn):
        return params

    async def ping(params, conn):
        if params.get("host"):
            return {"ms": await peers.ping(_str(params, "host"))}
        return {"pong": True}

    async def create(params, conn):
        return await wormholes.create(_words(params))

    async def child(params, conn):
        """A remote child for a wormhole on the calling daemon; its head faces the caller,
        or, over a tunnel, listens on this end's overlay address (`host`)."""
        port = params.get("service_port")
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'service_port' must be a port")
        proto = params.get("proto", "tcp")
        if proto not in PROTOS:
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'proto' must be tcp or udp")
        owner = _str(params, "owner")
        if not re.fullmatch(r"[A-Za-z0-9]{1,64}", owner):
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'owner' must be a daemon id (letters and digits)")
        try:
            ident = check_name(_str(params, "id"), "id")
        except SpecError as e:
            raise RpcError(protocol.INVALID_PARAMS, f"parameter 'id': {e}") from None
        host = conn.local_ip
        if params.get("tunnel"):
            host = _ip(params, "host")
            if tunnels.local_ip(owner) != host:
                raise Refused(f"{host} is not this host's end of a tunnel to the caller")
        ctx = Context(service_port=port, head_proto=proto, head_host=host, dialled=True)
        label = f"{params.get('parent') or '?'}@{conn.peer}"
        return await wormholes.create(_words(params), ident, ctx=ctx, save=False, owner=owner,
                                      owner_label=label, tunnel=bool(params.get("tunnel")))

    async def delete(params, conn):
        return await wormholes.delete(_str(params, "id"))

    async def list_(params, conn):
        return wormholes.list()

    async def tunnel_create(params, conn):
        kind = params.get("type")
        if kind is not None and kind not in ("wireguard", "ipsec"):
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'type' must be wireguard or ipsec")
        tunnel = await tunnels.ensure(_str(params, "host"), kind=kind, udp=bool(params.get("udp")),
                                      rekey=bool(params.get("rekey")))
        return {"local_ip": tunnel.local_ip, "remote_ip": tunnel.remote_ip, "interface": tunnel.ifname}

    async def tunnel_delete(params, conn):
        host = _str(params, "host")
        users = tunnels.users_of(host)
        if users and not params.get("force"):
            raise Refused(f"the tunnel to {host} is used by wormhole(s) {', '.join(sorted(users))}: "
                          f"delete them first, or use --force to delete them too")
        warnings = []
        for ident in sorted(users):
            with contextlib.suppress(Refused):  # gone meanwhile, or a remote child of the peer's
                warnings += (await wormholes.delete(ident))["warnings"]
        return {"warnings": warnings + await tunnels.delete(host)}

    async def tunnel_list(params, conn):
        return await tunnels.list()

    # the far half of a tunnel, asked for by the peer's daemon (see tunnels/table.py)
    async def tunnel_hello(params, conn):
        return await tunnels.hello(_str(params, "daemon_id"), params.get("type"), conn.local_ip)

    async def tunnel_build(params, conn):
        return await tunnels.build_far(params, conn.local_ip, conn.peer)

    async def tunnel_destroy(params, conn):
        return await tunnels.destroy_far(_str(params, "daemon_id"))

    return {"echo": echo, "ping": ping, "create": create, "child": child, "delete": delete, "list": list_,
            "tunnel-create": tunnel_create, "tunnel-delete": tunnel_delete, "tunnel-list": tunnel_list,
            "tunnel-hello": tunnel_hello, "tunnel-build": tunnel_build, "tunnel-destroy": tunnel_destroy}


class ControlServer:
    def __init__(self, methods: dict[str, Method], key: bytes):
        self._methods = methods
        self._ctx = server_context(key)
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        # (method, outcome) -> requests answered; outcome: ok, invalid (a JSON-RPC error), refused, failed.
        # Method names not served count as "(unknown)", lines that are no request as "(none)".
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()

    async def serve(self, sock: socket.socket) -> None:
        kw = dict(sock=sock, ssl=self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                  limit=protocol.MAX_LINE + 2)
        if sock.family == socket.AF_UNIX:
            # cleanup_socket=False: the socket file is the daemon's to remove (main.py), not the
            # server's when it closes: at a handover the successor serves the same file.
            server = await asyncio.start_unix_server(self._handle, cleanup_socket=False, **kw)
        else:
            server = await asyncio.start_server(self._handle, **kw)
        self._servers.append(server)

    async def aclose(self) -> None:
        """Stop accepting, cancel the handlers still running (and wait for their rollback)."""
        for server in self._servers:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=30)
        for writer in list(self._conns):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)
        self._servers.clear()  # serve() may start again (a handover that did not happen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self._conns.add(writer)
        conn = _conn(writer)
        framer = protocol.LineFramer()
        try:
            while data := await reader.read(1 << 16):
                for line in framer.feed(data):
                    writer.write(await self._answer(line, conn))
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._handlers.discard(task)
            self._conns.discard(writer)
            writer.close()

    async def _answer(self, line, conn: Conn) -> bytes:
        try:
            req = protocol.parse_request(line)
        except RpcError as e:
            self.requests["(none)", "invalid"] += 1
            return protocol.error((e.data or {}).get("id"), e)
        method = self._methods.get(req.method)
        if method is None:
            self.requests["(unknown)", "invalid"] += 1
            return protocol.error(req.id, RpcError(protocol.METHOD_NOT_FOUND, f"unknown method {req.method!r}"))
        try:
            reply = protocol.result(req.id, await method(req.params, conn))
        except RpcError as e:
            self.requests[req.method, "invalid"] += 1
            return protocol.error(req.id, e)
        except DaemonError as e:
            self.requests[req.method, "refused" if isinstance(e, Refused) else "failed"] += 1
            return protocol.error(req.id, to_rpc(e))
        except Exception as e:  # a bug or an unexpected system failure: the daemon stays up
            self.requests[req.method, "failed"] += 1
            log.exception("method %s failed", req.method)
            return protocol.error(req.id, to_rpc(Failed(f"{req.method} failed: {e}")))
        self.requests[req.method, "ok"] += 1
        return reply
