"""Wormholes (segments) and their lifecycle: build, trigger, children, teardown.

A Segment is one proxy: a head listening in some namespace and a tail it
dials. It builds what its Plan says; what is deferred by `trigger` (the tail's
namespace and what lies behind the tail) is built once, on the first
connection, while later connections wait for the same attempt. What lies
behind the tail (nothing, a local child, a remote one, a tunnel) is its Link's
business (`links.py`). Every resource a segment makes is pushed on an exit
stack, so a failed build or a delete leaves nothing behind.

States: *armed* (listening; the tail side is built on the next connection)
and *active* (the tail side is built: `target` is set). A remote child that
stops answering sends the segment back to armed, so the next connection
builds it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wormhole.spec import Place, Plan

from .errors import Failed, Refused
from .limits import Defaults
from .links import Target, format_unix, format_url, link_for
from .metrics import Counters
from .netns import Netns, make_socket
from .peers import Peers
from .places import Places
from .proxy.native import EngineHub, NativeTcpProxy
from .proxy.tcp import Stats, TcpProxy
from .proxy.udp import UdpProxy
from .tails import Tails
from .unixsock import UnixHeadError, adopt_unix, listen_unix

if TYPE_CHECKING:
    from .tunnels.table import Tunnels

log = logging.getLogger("wormholed")


@dataclass
class Env:
    """What segments use from the daemon: places (namespaces, containers), peers, tunnels,
    and the native TCP engine (None: the pure-Python relay)."""

    places: Places
    peers: Peers | None = None
    tunnels: Tunnels | None = None
    daemon_id: str = ""
    engine: EngineHub | None = None
    limits: Defaults = Defaults()


def family_of(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


class Segment:
    def __init__(self, plan: Plan, ident: str, env: Env, *, parent: Segment | None = None,
                 inherited: dict[Place, Netns | None] | None = None, owner: str | None = None,
                 adoptions: dict | None = None):
        """adoptions: segment id -> handover.daemon.Adopted, what a predecessor handed over
        (its head socket, connections, containers) for this segment and its local children."""
        self.plan, self.id, self.parent, self.owner = plan, ident, parent, owner
        self.owner_label: str | None = None  # how `list` names the owner of a remote child
        self.asked: tuple = ()  # (words, context, over a tunnel): what the create asked for
        self.asked_id = ident  # the id the create asked for (a remote child's: without its owner's tag)
        self.env = env
        self._link = link_for(plan)
        self._inherited = inherited or {}
        self._stack = contextlib.AsyncExitStack()  # head side: lives as long as the segment
        self._armed_stack: contextlib.AsyncExitStack | None = None  # tail side + child
        self._arming: asyncio.Future | None = None
        self._disarming: asyncio.Future | None = None  # undoing a tail side that stopped working
        self.head_url = ""
        self.head_ns: Netns | None = None
        self.head_port = 0
        self.target: Target | None = None
        self.tails: Tails | None = None  # the target and add-tail's, set with it
        self.child: Segment | None = None
        self.remote: tuple[str, str] | None = None  # (host, id) of a child on another daemon
        self.warnings: list[str] = []  # what teardown could not undo (an unreachable peer)
        self.stats = Stats()
        self.counters = Counters()  # trigger runs, failed tail dials (for metrics.py)
        self._proxy: TcpProxy | NativeTcpProxy | UdpProxy | None = None
        self._closed = False
        self._adoptions = adoptions or {}
        self.head_sock: socket.socket | None = None
        self.containers: list[tuple[str, str]] = []  # (docker-run place, container id) while they run

    @property
    def limits(self) -> tuple[int, float]:
        """(max_conns, idle_timeout) in force: the wormhole's words, else the daemon's; 0: none."""
        return self.env.limits.resolve(self.plan.head.proto, self.plan.max_conns, self.plan.idle_timeout)

    @property
    def state(self) -> str:
        return "active" if self.target is not None else "armed"

    @property
    def root(self) -> Segment:
        seg = self
        while seg.parent is not None:
            seg = seg.parent
        return seg

    def chain(self):
        seg: Segment | None = self
        while seg is not None:
            yield seg
            seg = seg.child

    def hold(self, callback) -> None:
        """Call `callback()` when the segment closes (a resource it uses, such as a tunnel)."""
        self._stack.callback(callback)

    async def _open(self, place: Place, stack: contextlib.AsyncExitStack) -> Netns | None:
        if place in self._inherited:
            return self._inherited[place]
        adopted = self._adoptions.get(self.id)

        def started(cid: str) -> None:
            entry = (str(place), cid)
            self.containers.append(entry)
            stack.callback(self.containers.remove, entry)

        return await self.env.places.open(place, stack, self.id, started=started,
                                          adopt=adopted.containers.get(str(place)) if adopted else None)

    async def start_child(self, tail_ns: Netns | None) -> Segment:
        """Build this wormhole's local child; it shares the tail's namespace (and container)."""
        plan = self.plan.child
        ident = self.plan.chain_ids(self.id)[1]
        child = Segment(plan, ident, self.env, parent=self, inherited={self.plan.tail.place: tail_ns},
                        adoptions=self._adoptions)
        await child.start()
        return child

    async def start(self) -> None:
        """Listen, and unless triggered build the tail side; on failure nothing is left."""
        try:
            head = self.plan.head
            ns = await self._open(head.place, self._stack)
            self.head_ns = ns
            udp = head.proto == "udp"
            adopted = self._adoptions.get(self.id)
            given = adopted.head if adopted else None
            sock = await (self._listen_unix(ns, given) if head.unix else self._listen(ns, given))
            self.head_sock = sock
            if not self.plan.trigger or (adopted and adopted.active):
                await self._arm()
            conns, idle = self.limits
            # The native engine relays one tcp tail; unix ends and several tails take the Python relay.
            # So does a k8s-ns tail, whose pod is looked up for each connection.
            native = (not head.unix and len(self.plan.all_tails) == 1 and not self.plan.tail.unix
                      and self.plan.tail.place.kind != "k8s-ns")
            if udp:
                self._proxy = UdpProxy(sock, self._open_flow, stats=self.stats, log=log, max_flows=conns,
                                       idle_timeout=idle, name=f"wormhole {self.id}", closed=self._closed_tail)
            elif self.env.engine is not None and native:
                self._proxy = NativeTcpProxy(sock, self._connect_tail, hub=self.env.engine, stats=self.stats,
                                              failed=lambda _: self._tail_failed(self.target), log=log,
                                              max_conns=conns, idle_timeout=idle)
            else:
                self._proxy = TcpProxy(sock, self._connect_tail, stats=self.stats, log=log,
                                       max_conns=conns, idle_timeout=idle, closed=self._closed_tail)
            self._proxy.start()
            self._retarget()
            if adopted is not None:
                from .handover.daemon import adopt_connections

                adopt_connections(self, adopted)
        except BaseException:
            await self.aclose()
            raise

    async def _listen(self, ns: Netns | None, sock: socket.socket | None = None) -> socket.socket:
        """The head's socket: made here, or a predecessor's (handed over)."""
        head = self.plan.head
        udp = head.proto == "udp"
        try:
            if sock is None:
                sock = await make_socket(ns, family_of(head.host), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM,
                                         bind=(head.host, head.port or 0), listen=None if udp else 1024)
        except OSError as e:
            raise Refused(f"cannot listen on {format_url(head.proto, ns, head.host, head.port or 0)}: "
                          f"{e.strerror or e}") from None
        self._stack.callback(sock.close)
        host, port = sock.getsockname()[:2]
        self.head_url = format_url(head.proto, ns, host, port)
        self.head_port = port
        return sock

    async def _listen_unix(self, ns: Netns | None, sock: socket.socket | None = None) -> socket.socket:
        """A unix head: its socket file is removed when the segment closes (unixsock.py)."""
        try:
            if sock is not None:
                remove = adopt_unix(ns, self.plan.head.path, sock)
            else:
                sock, remove = await listen_unix(ns, self.plan.head.path, self.plan.mode)
        except UnixHeadError as e:
            raise Refused(e.strerror) from None
        self._stack.callback(remove)  # after the close below (the stack unwinds last in, first out)
        self._stack.callback(sock.close)
        self.head_url = format_unix(ns, self.plan.head.path)
        return sock

    async def _arm(self) -> None:
        """Resolve the tail's namespace and build what lies behind it; all or nothing."""
        if self._disarming is not None:
            await asyncio.shield(self._disarming)  # the stale half must be gone first
        stack = contextlib.AsyncExitStack()
        try:
            tail_ns = await self._open(self.plan.tail.place, stack)
            if (self.plan.tail.place.kind == "docker-ns" and self.plan.tail.place not in self._inherited
                    and tail_ns is not None and tail_ns.pidfd >= 0):
                self._follow(tail_ns, stack)
            reached = await self._link.open(self, tail_ns, stack)
            targets = [reached.target]
            for end in self.plan.tails:  # add-tail's
                targets.append(Target(await self._open(end.place, stack), end.host, end.port, end.path))
            for i, end in enumerate(self.plan.all_tails):  # a pod is looked up for each connection
                if (end.place.kind == "k8s-ns" and end.place not in self._inherited
                        and not (i == 0 and self.plan.linked)):
                    targets[i] = dataclasses.replace(
                        targets[i], resolve=self.env.places.follower(end.place, stack, targets[i].ns))
            tails = Tails(targets, self.plan.balance, f"wormhole {self.id}")
            stack.push_async_callback(tails.aclose)
        except BaseException:
            await stack.aclose()
            raise
        self._armed_stack, self.child, self.remote = stack, reached.child, reached.remote
        self.target, self.tails = reached.target, tails
        self._retarget()

    def _retarget(self) -> None:
        """Tell a native proxy where new connections go (None: hand them to _connect_tail)."""
        if not isinstance(self._proxy, NativeTcpProxy):
            return
        t = self.target
        if t is None:
            self._proxy.clear_target()
        else:
            self._proxy.set_target(t.ns, t.host, t.port)

    async def _trigger(self) -> None:
        """Run the trigger once; connections that arrive meanwhile wait for the same run."""
        if self._arming is None:
            log.info("wormhole %s: first connection, running its trigger", self.id)
            self.counters.trigger_started()
            self._arming = asyncio.ensure_future(self._arm())
            self._arming.add_done_callback(self._armed)
        await asyncio.shield(self._arming)

    def _armed(self, fut: asyncio.Future) -> None:
        self._arming = None  # a failed trigger is tried again by the next connection
        self.counters.trigger_ended(not fut.cancelled() and fut.exception() is None)
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
            return await self.tails.connect(getattr(self._proxy, "finish_connect", None))
        except OSError:
            self._tail_failed(t)
            raise

    def _closed_tail(self, sock: socket.socket) -> None:
        if self.tails is not None:
            self.tails.closed(sock)

    def _tail_failed(self, t: Target | None) -> None:
        """A connection to tail t failed for good: a remote child that stopped answering is dropped."""
        self.counters.dial_failures += 1
        if self.remote is not None and t is not None and self.target is t:
            host, ident = self.remote
            self._disarm(f"its child {ident} on {host} does not answer; it is rebuilt on the next connection")

    def _follow(self, ns: Netns, stack: contextlib.AsyncExitStack) -> None:
        """A docker-ns tail: once the container's process exits (a restart gives the container
        a new namespace) the tail side is dropped, and the next connection finds it again."""
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(ns.pidfd)
            if self.target is not None and not self._closed:
                self._disarm(f"container {self.plan.tail.place.arg!r} stopped or restarted; "
                             f"its namespace is looked up again on the next connection")

        loop.add_reader(ns.pidfd, gone)
        stack.callback(loop.remove_reader, ns.pidfd)

    def _disarm(self, why: str) -> None:
        """The tail side stopped working (a remote child's daemon restarted, a docker-ns
        container restarted): drop it, so that the next connection builds it again."""
        log.warning("wormhole %s: %s", self.id, why)
        stack, self._armed_stack = self._armed_stack, None
        self.target = self.tails = self.child = self.remote = None
        self._retarget()
        self._disarming = asyncio.ensure_future(stack.aclose())
        self._disarming.add_done_callback(lambda _: setattr(self, "_disarming", None))

    async def _open_flow(self) -> socket.socket:
        await self._target()
        return await self.tails.open_flow()

    def describe(self) -> dict:
        stats = self._proxy.stats if isinstance(self._proxy, NativeTcpProxy) else self.stats
        tail = self.target.url(self.plan.tail.proto) if self.target else f"{self.plan.tail} (on the next connection)"
        child = None
        if self.remote:
            child = f"{self.remote[1]}@{self.remote[0]}"
        elif self.child:
            child = self.child.id
        link = self.plan.link
        return {
            "id": self.id, "parent": self.parent.id if self.parent else self.owner_label, "child": child,
            "remote": link.host if link and link.remote else None,
            "transport": link.transport if link and link.remote else None,
            "head": self.head_url, "tail": tail, "state": self.state,
            "connections": stats.connections, "total": stats.total,
            "bytes_in": stats.bytes_in, "bytes_out": stats.bytes_out, "refused": stats.refused,
            "max_conns": self.limits[0] or None, "idle_timeout": self.limits[1] or None,
            "tails": self._describe_tails(),
        }

    def _describe_tails(self) -> list[dict]:
        """Each tail: its url and, with several, its state (up/down) and counts."""
        if self.tails is not None:
            return self.tails.describe(self.plan.tail.proto)
        return [{"url": f"{end} (on the next connection)"} for end in self.plan.all_tails]

    def forget(self) -> None:
        """Let go without teardown (a handover took what the segment held): nothing it made
        is closed, removed or deleted; timers and probes stop."""
        self._closed = True
        if self.tails is not None:
            self.tails.stop()

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
