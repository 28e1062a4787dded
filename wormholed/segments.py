"""Wormholes (segments) and their lifecycle: build, trigger, children, teardown.

A Segment is one proxy: a head listening in some namespace and a tail it
dials. It builds what its Plan says; what is deferred by `trigger` (the tail's
namespace and the child) is built once, on the first connection, while later
connections wait for the same attempt. Every resource a segment makes is pushed
on an exit stack, so a failed build or a delete leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass

from wormhole.docker_args import parse_run_args
from wormhole.protocol import Failed, Refused, RpcError
from wormhole.spec import HOST, Endpoint, Place, Plan

from .docker import Docker
from .netns import Netns, NetnsError, hostport, make_socket
from .peers import Peers
from .proxy.tcp import Stats, TcpProxy, dial
from .proxy.udp import UdpProxy, dial_udp

log = logging.getLogger("wormholed")

NOT_YET = {
    "tunnel": "'tunnel' needs tunnel support, which this wormholed does not have yet",
    "udptunnel": "'udptunnel' needs tunnel support, which this wormholed does not have yet",
}


def check_supported(plan: Plan) -> None:
    """Refuse, before anything is built (even when deferred by a trigger), words whose
    support has not landed. A remote child's words are its own daemon's to check."""
    for p in plan.chain():
        if p.link is not None and p.link.kind in NOT_YET:
            raise Refused(NOT_YET[p.link.kind])


class Places:
    """Turns a Place into an open Netns (None: the daemon's own namespace); what it
    starts (a container) and opens is undone by `stack`."""

    def __init__(self, docker: Docker | None = None):
        self._docker = docker

    async def open(self, place: Place, stack: contextlib.AsyncExitStack, owner: str) -> Netns | None:
        if place == HOST:
            return None
        if place.kind == "netns":
            try:
                ns = Netns.named(place.arg)
            except NetnsError as e:
                raise Refused(str(e)) from None
        elif self._docker is None:
            raise Refused(f"{place}: this wormholed has no Docker support")
        elif place.kind == "docker-ns":
            ns = await self._docker.netns(place.arg)
        elif place.kind == "docker-run":
            cid, ns = await self._docker.run(parse_run_args(place.arg), owner)
            stack.push_async_callback(self._docker.remove, cid)
        else:
            raise Refused(f"unknown place {place}")
        stack.callback(ns.close)
        return ns


@dataclass
class Env:
    """What segments use from the daemon: namespaces (and containers), and peers."""

    places: Places
    peers: Peers | None = None


def child_id(plan: Plan, parent_id: str) -> str:
    return plan.id or f"{parent_id}.1"


def chain_ids(plan: Plan, root_id: str) -> list[str]:
    """The ids a wormhole and its (future) local children get."""
    ids = [root_id]
    for p in list(plan.chain())[1:]:
        ids.append(child_id(p, ids[-1]))
    return ids


def remote_child_id(plan: Plan, parent_id: str) -> str:
    return plan.link.spec.id or f"{parent_id}.1"


def family_of(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def format_url(proto: str, ns: Netns | None, host: str, port: int) -> str:
    return f"{proto}://{f'{ns.label}@' if ns is not None else ''}{hostport(host, port)}"


@dataclass
class Target:
    """Where a tail dials, once known."""

    ns: Netns | None
    host: str
    port: int

    def url(self, proto: str) -> str:
        return format_url(proto, self.ns, self.host, self.port)


class Segment:
    def __init__(self, plan: Plan, ident: str, env: Env, *, parent: Segment | None = None,
                 inherited: dict[Place, Netns | None] | None = None, owner: str | None = None):
        self.plan, self.id, self.parent, self.owner = plan, ident, parent, owner
        self._env = env
        self._inherited = inherited or {}
        self._stack = contextlib.AsyncExitStack()  # head side: lives as long as the segment
        self._armed_stack: contextlib.AsyncExitStack | None = None  # tail side + child
        self._arming: asyncio.Future | None = None
        self._disarming: asyncio.Future | None = None  # undoing a tail side that stopped working
        self.head_url = ""
        self.head_ns: Netns | None = None
        self.head_port = 0
        self.target: Target | None = None
        self.child: Segment | None = None
        self.remote: tuple[str, str] | None = None  # (host, id) of a child on another daemon
        self.warnings: list[str] = []  # what teardown could not undo (an unreachable peer)
        self.stats = Stats()
        self._proxy: TcpProxy | UdpProxy | None = None
        self._closed = False

    @property
    def state(self) -> str:
        return "active" if self.target is not None else "armed"

    def chain(self):
        seg: Segment | None = self
        while seg is not None:
            yield seg
            seg = seg.child

    async def _open(self, place: Place, stack: contextlib.AsyncExitStack) -> Netns | None:
        if place in self._inherited:
            return self._inherited[place]
        return await self._env.places.open(place, stack, self.id)

    async def start(self) -> None:
        """Listen, and unless triggered build the tail side; on failure nothing is left."""
        try:
            head = self.plan.head
            ns = await self._open(head.place, self._stack)
            udp = head.proto == "udp"
            try:
                sock = await make_socket(ns, family_of(head.host), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                                         bind=(head.host, head.port or 0), listen=None if udp else 1024)
            except OSError as e:
                raise Refused(f"cannot listen on {format_url(head.proto, ns, head.host, head.port or 0)}: "
                              f"{e.strerror or e}") from None
            self._stack.callback(sock.close)
            host, port = sock.getsockname()[:2]
            self.head_url = format_url(head.proto, ns, host, port)
            self.head_ns, self.head_port = ns, port
            if not self.plan.trigger:
                await self._arm()
            if udp:
                self._proxy = UdpProxy(sock, self._open_flow, stats=self.stats, log=log)
            else:
                self._proxy = TcpProxy(sock, self._connect_tail, stats=self.stats, log=log)
            self._proxy.start()
        except BaseException:
            await self.aclose()
            raise

    async def _arm(self) -> None:
        """Resolve the tail's namespace and build the child; all or nothing."""
        if self._disarming is not None:
            await asyncio.shield(self._disarming)  # the stale half must be gone first
        stack = contextlib.AsyncExitStack()
        try:
            tail = self.plan.tail
            tail_ns = await self._open(tail.place, stack)
            child = None
            if self.plan.child is not None:
                child = Segment(self.plan.child, child_id(self.plan.child, self.id), self._env, parent=self,
                                inherited={tail.place: tail_ns})
                await child.start()
                stack.push_async_callback(child.aclose)
            if self.plan.link is not None and self.plan.link.remote:
                target = await self._remote_child(stack)
            elif self.plan.linked:
                target = Target(child.head_ns, child.plan.head.host, child.head_port)
            else:
                target = Target(tail_ns, tail.host, tail.port)
        except BaseException:
            await stack.aclose()
            raise
        self._armed_stack, self.child, self.target = stack, child, target

    async def _remote_child(self, stack: contextlib.AsyncExitStack) -> Target:
        """Have the peer build the child; its head is where our tail dials."""
        link = self.plan.link
        ident = remote_child_id(self.plan, self.id)
        res = await self._env.peers.call(link.host, "child", {
            "words": list(link.words), "id": ident, "service_port": self.plan.service_port,
            "proto": self.plan.tail.proto, "owner": f"{socket.gethostname()}:{self.id}",
        })
        self.remote = (link.host, res["id"])
        stack.push_async_callback(self._delete_remote, link.host, res["id"])
        return Target(None, res["host"], res["port"])

    async def _delete_remote(self, host: str, ident: str) -> None:
        try:
            await self._env.peers.call(host, "delete", {"id": ident})
        except RpcError as e:
            self.warnings.append(f"the remote half {ident!r} on {host} could not be deleted: {e}")
            log.warning("wormhole %s: %s", self.id, self.warnings[-1])

    async def _trigger(self) -> None:
        """Run the trigger once; connections that arrive meanwhile wait for the same run."""
        if self._arming is None:
            log.info("wormhole %s: first connection, running its trigger", self.id)
            self._arming = asyncio.ensure_future(self._arm())
            self._arming.add_done_callback(self._armed)
        await asyncio.shield(self._arming)

    def _armed(self, fut: asyncio.Future) -> None:
        self._arming = None  # a failed trigger is tried again by the next connection
        if not fut.cancelled() and fut.exception() is not None:
            log.error("wormhole %s: trigger failed: %s", self.id, fut.exception())

    async def _target(self) -> Target:
        if self._closed:
            raise Failed(f"wormhole {self.id} is closed")
        if self.target is None:
            await self._trigger()
        return self.target

    async def _connect_tail(self) -> socket.socket:
        t = await self._target()
        try:
            return await dial(t.ns, t.host, t.port, wait=self._proxy.finish_connect)
        except OSError:
            if self.remote is not None and self.target is t:
                self._disarm()
            raise

    def _disarm(self) -> None:
        """The remote child stopped answering (its daemon restarted, say): drop this
        tail side, so that the next connection builds the child again."""
        host, ident = self.remote
        log.warning("wormhole %s: its child %s on %s does not answer; it is rebuilt on the next connection",
                    self.id, ident, host)
        stack, self._armed_stack = self._armed_stack, None
        self.target = self.child = self.remote = None
        self._disarming = asyncio.ensure_future(stack.aclose())
        self._disarming.add_done_callback(lambda _: setattr(self, "_disarming", None))

    async def _open_flow(self) -> socket.socket:
        t = await self._target()
        return await dial_udp(t.ns, t.host, t.port)

    def describe(self) -> dict:
        tail = self.target.url(self.plan.tail.proto) if self.target else _pending(self.plan.tail)
        child = None
        if self.remote:
            child = f"{self.remote[1]}@{self.remote[0]}"
        elif self.child:
            child = self.child.id
        return {
            "id": self.id, "parent": self.parent.id if self.parent else self.owner, "child": child,
            "remote": self.plan.link.host if self.plan.link and self.plan.link.remote else None,
            "head": self.head_url, "tail": tail, "state": self.state,
            "connections": self.stats.connections, "total": self.stats.total,
            "bytes_in": self.stats.bytes_in, "bytes_out": self.stats.bytes_out,
        }

    async def aclose(self) -> None:
        """Stop listening, close connections, then tear down the child and namespaces."""
        if self._closed:
            return
        self._closed = True
        if self._arming is not None:
            self._arming.cancel()
            with contextlib.suppress(BaseException):
                await self._arming
        if self._proxy is not None:
            await self._proxy.aclose()
        if self._disarming is not None:
            with contextlib.suppress(Exception):
                await self._disarming
        if self._armed_stack is not None:
            await self._armed_stack.aclose()
        await self._stack.aclose()
        if self.child is not None:  # its own warnings include its children's
            self.warnings.extend(self.child.warnings)


def _pending(tail: Endpoint) -> str:
    where = "" if tail.place == HOST else f"{tail.place}@"
    return f"{tail.proto}://{where}{tail.host or '*'}:{tail.port or '*'} (on the next connection)"
