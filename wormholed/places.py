"""Places: from what the words named (the daemon's namespace, a named netns, a
container to find or to start) to an open network namespace.

What opening a place starts (a container) or opens (a namespace fd) is undone
by the exit stack the caller passes, so whoever owns the stack owns the place."""

from __future__ import annotations

import contextlib

from wormhole.docker_args import parse_run_args
from wormhole.spec import HOST, Place

from .docker import Docker
from .errors import Refused
from .netns import Netns, NetnsError


class Places:
    def __init__(self, docker: Docker | None = None):
        self._docker = docker

    async def open(self, place: Place, stack: contextlib.AsyncExitStack, owner: str, *,
                   adopt: list[str] | None = None, started=None) -> Netns | None:
        """The namespace of `place` (None: the daemon's own); `owner` labels a container it starts.
        A docker-run place takes the first container of `adopt` if any (a predecessor's, handed
        over) instead of starting one; `started(container_id)` hears of the container either way."""
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
            if adopt:
                cid = adopt.pop(0)
                ns = await self._docker.netns(cid)
            else:
                cid, ns = await self._docker.run(parse_run_args(place.arg), owner)
            stack.push_async_callback(self._docker.remove, cid)
            if started is not None:
                started(cid)
        else:
            raise Refused(f"unknown place {place}")
        stack.callback(ns.close)
        return ns
