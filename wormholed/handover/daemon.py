"""The daemon's side of a handover: its wormholes into a record and fds, and back.

Exporting (the old daemon): every root wormhole with the words it was made with (and, for
a remote child, what its owner asked), then per segment its head socket, whether its tail
side is built (a triggered one that ran is rebuilt at once, not on the next connection),
its docker-run containers (adopted, not started again), its counters, and what its proxy
gives up: relays with their halves, clients still being dialled, UDP flows.

Adopting (the successor): each wormhole is created again from its words as at a restart,
but a segment takes its predecessor's head socket instead of binding one, its containers
instead of running them, and its proxy takes the relays and flows (adopt_connections). A
remote child's parent asks its peer again with the same words, and the peer keeps the
child it has (wormholes.py), so relays through it go on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wormhole.spec import Context, Place

from ..proxy.native import NativeTcpProxy
from ..proxy.tcp import TcpProxy
from ..proxy.udp import UdpProxy
from .record import FdTable, half, half_buffered

if TYPE_CHECKING:
    from ..segments import Segment
    from ..wormholes import Wormholes

log = logging.getLogger("wormholed")


@dataclass
class Adopted:
    """What a segment takes from its predecessor (live objects, made from the record)."""

    head: socket.socket | None
    active: bool = False
    containers: dict[str, list[str]] = field(default_factory=dict)  # docker-run place -> container ids
    stats: tuple[int, int, int, int] = (0, 0, 0, 0)  # total, bytes_in, bytes_out, refused
    relays: list[tuple] = field(default_factory=list)  # (client, tail, up, down, tail_index)
    clients: list[socket.socket] = field(default_factory=list)
    flows: list[tuple] = field(default_factory=list)  # (addr, sock, tail_index)

    def close(self) -> None:
        """Close what was not taken (a wormhole that could not be adopted)."""
        for sock in [self.head, *self.clients] + [r[0] for r in self.relays] + [r[1] for r in self.relays] \
                + [f[1] for f in self.flows]:
            if sock is not None:
                sock.close()
        for r in self.relays:
            for pipe, *_ in r[2:4]:
                for fd in pipe or ():
                    os.close(fd)


# --- the old daemon -----------------------------------------------------------------------

def _ctx_json(ctx: Context) -> dict:
    return {"service_port": ctx.service_port, "head_proto": ctx.head_proto,
            "head_place": [ctx.head_place.kind, ctx.head_place.arg], "head_host": ctx.head_host,
            "head_port": ctx.head_port, "head_path": ctx.head_path, "dialled": ctx.dialled}


def _ctx(d: dict) -> Context:
    return Context(d["service_port"], d["head_proto"], Place(*d["head_place"]), d["head_host"],
                   d["head_port"], d["head_path"], d["dialled"])


def _half(table: FdTable, h: tuple) -> dict:
    pipe, pending, buffered, done = h
    return half((table.add(pipe[0]), table.add(pipe[1])) if pipe else None, pending, buffered, done)


async def export_segment(seg: Segment, table: FdTable) -> dict:
    """Stop the segment's proxy and describe it. The fds go in `table`, owned by it: the
    proxy's sockets detached from their objects, the head socket (which the segment keeps)
    duplicated, so that nothing the old daemon drops later closes them."""
    proxy = seg._proxy
    entry = {"head": table.add(os.dup(seg.head_sock.fileno())) if seg.head_sock is not None else None,
             "active": seg.target is not None, "containers": {}, "stats": [],
             "relays": [], "clients": [], "flows": []}
    tail_of = seg.tails.index_of if seg.tails is not None else (lambda sock: 0)
    if isinstance(proxy, UdpProxy):
        for addr, sock in await proxy.export():
            index = tail_of(sock)
            entry["flows"].append({"addr": list(addr), "sock": table.add(sock.detach()), "tail_index": index})
    elif proxy is not None:
        relays, clients = await proxy.export()
        for client, tail, up, down in relays:
            index = tail_of(tail)
            entry["relays"].append({"client": table.add(client.detach()), "tail": table.add(tail.detach()),
                                    "tail_index": index, "up": _half(table, up), "down": _half(table, down)})
        for client in clients:
            entry["clients"].append(table.add(client.detach()))
    if seg._arming is not None:  # a trigger running: its waiting clients are out (above); stop it and
        log.info("wormhole %s: its trigger is running: stopped, and what it built undone, for the "
                 "handover (it runs again after)", seg.id)
        seg._arming.cancel()      # undo what it built (a container it started is removed)
        await asyncio.gather(seg._arming, return_exceptions=True)
    for place, cid in seg.containers:
        entry["containers"].setdefault(place, []).append(cid)
    stats = proxy.stats if proxy is not None else seg.stats  # after: the last bytes moved are in
    entry["stats"] = [stats.total, stats.bytes_in, stats.bytes_out, stats.refused]
    return entry


async def export_wormholes(wormholes: Wormholes, table: FdTable) -> list[dict]:
    """The record's "wormholes": every one's words, and its segments' export_segment()."""
    out = []
    for root in wormholes.roots():
        words, ctx, tunnel = root.asked
        segments = {}
        for seg in root.chain():
            segments[seg.id] = await export_segment(seg, table)
        out.append({"id": root.asked_id, "words": list(words), "saved": root.owner is None,
                    "owner": root.owner, "owner_label": root.owner_label, "tunnel": tunnel,
                    "ctx": _ctx_json(ctx) if root.owner is not None else None, "segments": segments})
    return out


# --- the successor -------------------------------------------------------------------------

def _sock(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)


def _half_of(h: dict, fds: list[int]) -> tuple:
    pipe = (fds[h["pipe"][0]], fds[h["pipe"][1]]) if h["pipe"] is not None else None
    return pipe, h["pending"], half_buffered(h), h["done"]


def adopted(entry: dict, fds: list[int]) -> Adopted:
    """A segment's record entry as live objects."""
    return Adopted(
        head=_sock(fds[entry["head"]]) if entry["head"] is not None else None,
        active=entry["active"], containers={k: list(v) for k, v in entry["containers"].items()},
        stats=tuple(entry["stats"]),
        relays=[(_sock(fds[r["client"]]), _sock(fds[r["tail"]]), _half_of(r["up"], fds), _half_of(r["down"], fds),
                 r.get("tail_index", 0)) for r in entry["relays"]],
        clients=[_sock(fds[i]) for i in entry["clients"]],
        flows=[(tuple(f["addr"]), _sock(fds[f["sock"]]), f.get("tail_index", 0)) for f in entry["flows"]])


def adopt_connections(seg: Segment, ad: Adopted) -> None:
    """Give a started segment's proxy what its predecessor's had."""
    proxy = seg._proxy
    total, bytes_in, bytes_out, refused = ad.stats
    if isinstance(proxy, NativeTcpProxy):  # its adopt() counts each connection in total itself
        proxy.add_stats(max(0, total - len(ad.relays) - len(ad.clients)), bytes_in, bytes_out, refused)
    else:
        s = seg.stats
        s.total, s.bytes_in, s.bytes_out, s.refused = s.total + total, s.bytes_in + bytes_in, \
            s.bytes_out + bytes_out, s.refused + refused
    tails = seg.tails
    if isinstance(proxy, UdpProxy):
        for addr, sock, index in ad.flows:
            proxy.adopt(addr, sock)
            if tails is not None:
                tails.adopted(sock, index)
    elif isinstance(proxy, (TcpProxy, NativeTcpProxy)):
        for client, tail, up, down, index in ad.relays:
            if tails is not None:
                tails.adopted(tail, index)
            proxy.adopt(client, tail, up, down)
        for client in ad.clients:
            proxy.redial(client)
    ad.relays, ad.clients, ad.flows, ad.head = [], [], [], None  # taken


async def adopt_wormholes(wormholes: Wormholes, entries: list[dict], fds: list[int], log) -> set[str]:
    """Create each handed-over wormhole again with what it had; the ids adopted. One that
    cannot be is logged and its connections closed (the others go on)."""
    done = set()
    for entry in entries:
        adoptions = {}
        try:
            adoptions = {seg_id: adopted(e, fds) for seg_id, e in entry["segments"].items()}
            await wormholes.create(entry["words"], entry["id"], ctx=_ctx(entry["ctx"]) if entry["ctx"] else Context(),
                                   save=False, owner=entry["owner"], owner_label=entry["owner_label"],
                                   tunnel=entry["tunnel"], adoptions=adoptions)
            done.add(entry["id"])
        except Exception as e:
            log.error("handover: wormhole %s could not be taken over: %s; its connections are closed",
                      entry["id"], e)
        finally:
            for ad in adoptions.values():
                ad.close()
    return done


def describe(entries: list[dict]) -> str:
    """What a record hands over, for the log: connections, flows, bytes in flight."""
    segments = [seg for e in entries for seg in e["segments"].values()]
    relays = [r for seg in segments for r in seg["relays"]]
    in_flight = sum(h["pending"] + len(half_buffered(h)) for r in relays for h in (r["up"], r["down"]))
    return (f"{len(entries)} wormhole(s), {len(relays)} connection(s) "
            f"({sum(len(seg['clients']) for seg in segments)} more being dialled), "
            f"{sum(len(seg['flows']) for seg in segments)} UDP flow(s), {in_flight} bytes in flight")


def containers_of(entries: list[dict]) -> frozenset[str]:
    """The docker-run containers the handed-over wormholes hold (not strays to remove)."""
    return frozenset(cid for e in entries for seg in e["segments"].values()
                     for ids in seg["containers"].values() for cid in ids)
