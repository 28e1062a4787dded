"""Links: what lies behind a wormhole's tail, one class per way a child can hang off it.

Every link answers one call, `await link.open(seg, tail_ns, stack) -> Reached`:
build what is behind the tail (nothing; a child on this daemon; a child on
another daemon, directly or over an encrypted tunnel to it) and say where the
tail dials. What it builds is pushed on `stack`, so closing the stack undoes
it, and a failure halfway leaves nothing. `Segment` neither knows nor cares
which kind it holds: `link_for(plan)` picks it once.

| words           | class        | the tail dials                                  |
|-----------------|--------------|-------------------------------------------------|
| (none)          | NoChild      | the tail address in the tail's namespace        |
| child / chain   | LocalChild   | the tail (child) or the child's head (chain)    |
| remote          | RemoteChild  | the child's head on the peer, facing this host  |
| tunnel/udptunnel| RemoteChild  | the child's head on the peer's overlay address  |
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from wormhole.spec import Link, Plan, hostport

from .errors import DaemonError
from .netns import Netns

if TYPE_CHECKING:
    from .segments import Segment

log = logging.getLogger("wormholed")


@dataclass(frozen=True)
class Target:
    """Where a tail dials."""

    ns: Netns | None
    host: str | None
    port: int | None
    path: str | None = None  # a unix socket (host and port None)
    # A k8s-ns tail: `async with resolve() as ns`, its namespace for one connection's dial.
    resolve: Callable[[], contextlib.AbstractAsyncContextManager[Netns]] | None = None

    def url(self, proto: str) -> str:
        if self.path is not None:
            return format_unix(self.ns, self.path)
        return format_url(proto, self.ns, self.host, self.port)

    @property
    def label(self) -> str:
        """How the log names it."""
        return self.url("unix" if self.path is not None else "tcp")


def format_url(proto: str, ns: Netns | None, host: str, port: int) -> str:
    """A URL that `url` reads back: tcp://[NS@|docker:NAME@]host:port."""
    return f"{proto}://{ns.prefix if ns is not None else ''}{hostport(host, port)}"


def format_unix(ns: Netns | None, path: str) -> str:
    """unix://[NS@]/PATH or unix:[NS@]@NAME, as `url` reads it back."""
    prefix = ns.prefix if ns is not None else ""
    return f"unix:{prefix}{path}" if path.startswith("@") else f"unix://{prefix}{path}"


@dataclass(frozen=True)
class Reached:
    target: Target
    child: Segment | None = None  # a local child
    remote: tuple[str, str] | None = None  # (host, id) of a child on another daemon


class Opener(Protocol):
    async def open(self, seg: Segment, tail_ns: Netns | None, stack: contextlib.AsyncExitStack) -> Reached: ...


class NoChild:
    async def open(self, seg, tail_ns, stack) -> Reached:
        tail = seg.plan.tail
        return Reached(Target(tail_ns, tail.host, tail.port, tail.path))


class LocalChild:
    async def open(self, seg, tail_ns, stack) -> Reached:
        child = await seg.start_child(tail_ns)
        stack.push_async_callback(child.aclose)
        if seg.plan.linked:  # chain: the tail is the child's head
            head = child.plan.head
            if head.unix:
                return Reached(Target(child.head_ns, None, None, head.path), child)
            return Reached(Target(child.head_ns, head.host, child.head_port), child)
        tail = seg.plan.tail
        return Reached(Target(tail_ns, tail.host, tail.port, tail.path), child)


class RemoteChild:
    """A child built by the peer's daemon (its `child` method); over a tunnel, its head
    listens on the peer's overlay address and the tunnel is held while the child lives."""

    def __init__(self, link: Link):
        self.link = link

    async def open(self, seg, tail_ns, stack) -> Reached:
        env, link = seg.env, self.link
        params = {
            "words": list(link.words), "id": seg.plan.remote_child_id(seg.id),
            "service_port": seg.plan.service_port, "proto": seg.plan.tail.proto,
            "owner": env.daemon_id, "parent": seg.id,
        }
        if link.tunnelled:
            tunnel = await env.tunnels.ensure(link.host, udp=link.transport == "udptunnel")
            stack.callback(env.tunnels.use(tunnel.peer_id, seg.root.id))
            params.update(host=tunnel.remote_ip, tunnel=True)
        res = await env.peers.call(link.host, "child", params)
        stack.push_async_callback(self._delete, seg, res["id"])
        return Reached(Target(None, res["host"], res["port"]), remote=(link.host, res["id"]))

    async def _delete(self, seg: Segment, ident: str) -> None:
        host = self.link.host
        try:
            await seg.env.peers.call(host, "delete", {"id": ident, "owner": seg.env.daemon_id})
        except DaemonError as e:
            seg.warnings.append(f"the remote half {ident!r} on {host} could not be deleted: {e}")
            log.warning("wormhole %s: %s", seg.id, seg.warnings[-1])


def link_for(plan: Plan) -> Opener:
    if plan.link is None:
        return NoChild()
    if plan.link.remote:
        return RemoteChild(plan.link)
    return LocalChild()
