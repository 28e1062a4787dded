"""The daemon's table of wormholes: create, delete, list, restore; records kept in step."""

from __future__ import annotations

import logging
import uuid

from wormhole.protocol import Refused, RpcError
from wormhole.spec import Context, Plan, SpecError, parse, plan

from .segments import Env, Places, Segment, chain_ids, check_supported
from .state import StateDir

log = logging.getLogger("wormholed")


class Wormholes:
    def __init__(self, state: StateDir, env: Env | None = None):
        self._state = state
        self._env = env or Env(Places())
        self._roots: dict[str, Segment | None] = {}  # None: being built (id reserved)

    def _taken(self) -> set[str]:
        taken = set()
        for ident, root in self._roots.items():
            taken.update(chain_ids(root.plan, ident) if root else [ident])
        return taken

    async def create(self, words: list[str], ident: str | None = None, *, ctx: Context = Context(),
                     save: bool = True, owner: str | None = None) -> dict:
        """Build a wormhole; `owner` marks a remote child (kept only while its parent wants it)."""
        try:
            p: Plan = plan(parse(words, child=owner is not None), ctx)
        except SpecError as e:
            raise Refused(str(e)) from None
        check_supported(p)
        root_id = ident or p.id or str(uuid.uuid4())
        old = self._roots.get(root_id)
        if owner is not None and old is not None and old.owner == owner:
            # The parent's daemon restarted and rebuilds its child: the old one is stale.
            log.info("wormhole %s: replaced at the request of its owner %s", root_id, owner)
            await self.delete(root_id)
        ids = chain_ids(p, root_id)
        clash = sorted(set(ids) & self._taken()) or sorted({i for i in ids if ids.count(i) > 1})
        if clash:
            raise Refused(f"a wormhole with id {clash[0]!r} already exists")
        self._roots[root_id] = None
        seg = Segment(p, root_id, self._env, owner=owner)
        try:
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
                if root and ident in chain_ids(root.plan, root_id):
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
            except (RpcError, KeyError, TypeError) as e:
                log.error("could not restore wormhole %s: %s", record.get("id", "?"), e)

    async def aclose(self) -> None:
        """Tear down every wormhole; their records stay for the next start."""
        roots, self._roots = self._roots, {}
        for root in roots.values():
            if root:
                await root.aclose()
