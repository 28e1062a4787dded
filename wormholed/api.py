"""The control server: TLS-PSK connections carrying JSON-RPC lines, methods -> daemon objects."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from wormhole import protocol
from wormhole.keys import server_context
from wormhole.protocol import Failed, RpcError
from wormhole.spec import PROTOS, Context

from .peers import Peers
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
    ip = ipaddress.ip_address(sockname[0])
    if ip.version == 6 and ip.ipv4_mapped:  # a dual-stack socket reached over IPv4
        ip = ip.ipv4_mapped
    return Conn(str(ip), str(peername[0]) if isinstance(peername, tuple) else "?")


def _str(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise RpcError(protocol.INVALID_PARAMS, f"parameter {name!r} must be a non-empty string")
    return value


def _words(params: dict) -> list[str]:
    words = params.get("words")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise RpcError(protocol.INVALID_PARAMS, "parameter 'words' must be a list of strings")
    return words


def methods(wormholes: Wormholes, peers: Peers) -> dict[str, Method]:
    async def echo(params, conn):
        return params

    async def ping(params, conn):
        if params.get("host"):
            return {"ms": await peers.ping(_str(params, "host"))}
        return {"pong": True}

    async def create(params, conn):
        return await wormholes.create(_words(params))

    async def child(params, conn):
        """A remote child for a wormhole on the calling daemon; its head faces the caller."""
        port = params.get("service_port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'service_port' must be a port")
        proto = params.get("proto", "tcp")
        if proto not in PROTOS:
            raise RpcError(protocol.INVALID_PARAMS, "parameter 'proto' must be tcp or udp")
        ctx = Context(service_port=port, head_proto=proto, head_host=conn.local_ip)
        owner = f"{params.get('owner') or conn.peer} (remote)"
        return await wormholes.create(_words(params), _str(params, "id"), ctx=ctx, save=False, owner=owner)

    async def delete(params, conn):
        return await wormholes.delete(_str(params, "id"))

    async def list_(params, conn):
        return wormholes.list()

    return {"echo": echo, "ping": ping, "create": create, "child": child, "delete": delete, "list": list_}


class ControlServer:
    def __init__(self, methods: dict[str, Method], key: bytes):
        self._methods = methods
        self._ctx = server_context(key)
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: set[asyncio.StreamWriter] = set()

    async def serve(self, sock: socket.socket) -> None:
        kw = dict(sock=sock, ssl=self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                  limit=protocol.MAX_LINE + 2)
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(self._handle, **kw)
        else:
            server = await asyncio.start_server(self._handle, **kw)
        self._servers.append(server)

    async def aclose(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._conns):
            writer.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            self._conns.discard(writer)
            writer.close()

    async def _answer(self, line, conn: Conn) -> bytes:
        try:
            req = protocol.parse_request(line)
        except RpcError as e:
            return protocol.error((e.data or {}).get("id"), e)
        method = self._methods.get(req.method)
        if method is None:
            return protocol.error(req.id, RpcError(protocol.METHOD_NOT_FOUND, f"unknown method {req.method!r}"))
        try:
            return protocol.result(req.id, await method(req.params, conn))
        except RpcError as e:
            return protocol.error(req.id, e)
        except Exception as e:  # a bug or an unexpected system failure: the daemon stays up
            log.exception("method %s failed", req.method)
            return protocol.error(req.id, Failed(f"{req.method} failed: {e}"))
