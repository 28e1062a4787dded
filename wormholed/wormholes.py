"""The daemon's table of wormholes: create, delete, list, restore; records kept in step.

A wormhole built for another daemon (a remote child) belongs to that daemon: its
id here carries its owner's tag (`ID.OWNER8`), so children of two daemons never
clash, and only records made by this daemon's own users are kept."""

from __future__ import annotations

import logging
import uuid

from wormhole.spec import Context, Plan, SpecError, parse, plan

from .errors import DaemonError, Refused
from .places import Places
from .segments import Env, Segment
from .state import StateDir

log = logging.getLogger("wormholed")


def owned_id(ident: str, owner: str) -> str:
    """The id a remote child gets on this daemon: its asked-for id and its owner's tag."""
    return f"{ident}.{owner[:8]}"


class Wormholes:
    def __init__(self, state: StateDir, env: Env | None = None):
        self._state = state
        self._env = env or Env(Places())
        self._roots: dict[str, Segment | None] = {}  # None: being built (id reserved)

    def _taken(self) -> set[str]:
        taken = set()
        for ident, root in self._roots.items():
            taken.update(root.plan.chain_ids(ident) if root else [ident])
        return taken

    async def create(self, words: list[str], ident: str | None = None, *, ctx: Context = Context(),
                     save: bool = True, owner: str | None = None, owner_label: str | None = None,
                     tunnel: bool = False) -> dict:
        """Build a wormhole. `owner`: the daemon id whose wormhole this is a remote child of
        (replaced when the same owner asks again: it restarted), shown in `list` as
        `owner_label`; `tunnel`: its head is on
        the overlay address of the tunnel to that owner, which it holds while it lives."""
        try:
            p: Plan = plan(parse(words, child=owner is not None), ctx)
        except SpecError as e:
            raise Refused(str(e)) from None
        root_id = ident or p.id or str(uuid.uuid4())
        if owner is not None:
            root_id = owned_id(root_id, owner)
            old = self._roots.get(root_id)
            if old is not None and old.owner == owner:
                # The parent's daemon restarted and rebuilds its child: the old one is stale.
                log.info("wormhole %s: replaced at the request of its owner", root_id)
                await self.delete(root_id)
        ids = p.chain_ids(root_id)
        clash = sorted(set(ids) & self._taken()) or sorted({i for i in ids if ids.count(i) > 1})
        if clash:
            raise Refused(f"a wormhole with id {clash[0]!r} already exists")
        self._roots[root_id] = None
        seg = Segment(p, root_id, self._env, owner=owner)
        seg.owner_label = owner_label
        try:
            if tunnel:
                seg.hold(self._env.tunnels.use(owner, root_id))
            await seg.start()
            if save:
                self._state.save(root_id, {"id": root_id, "words": list(words)})
        except BaseException:
            del self._roots[root_id]
            await seg.aclose()
            raise
        self._roots[root_id] = seg
        log.info("wormhole %s: %s -> %s", root_id, seg.head_url, seg.describe()["tail"])
        return {"id": root_id, "url": seg.head_url, "host": seg.plan.head.host, "port": seg.head_port}

    async def delete(self, ident: str) -> dict:
        seg = self._roots.get(ident)
        if seg is None:
            for root_id, root in self._roots.items():
                if root and ident in root.plan.chain_ids(root_id):
                    raise Refused(f"wormhole {ident!r} is part of {root_id!r}: delete {root_id!r}")
            raise Refused(f"no wormhole with id {ident!r}")
        del self._roots[ident]
        self._state.remove(ident)
        await seg.aclose()
        log.info("wormhole %s: deleted", ident)
        return {"id": ident, "warnings": seg.warnings}

    def list(self) -> list[dict]:
        return [s.describe() for root in self._roots.values() if root for s in root.chain()]

    async def restore(self) -> None:
        """Rebuild the wormholes recorded by an earlier run (listening again, triggers armed)."""
        for record in self._state.load():
            try:
                await self.create(record["words"], record["id"], save=False)
            except (DaemonError, KeyError, TypeError) as e:
                log.error("could not restore wormhole %s: %s", record.get("id", "?"), e)

    async def aclose(self) -> None:
        """Tear down every wormhole; their records stay for the next start."""
        roots, self._roots = self._roots, {}
        for root in roots.values():
            if root:
                await root.aclose()
