"""The daemon's table of wormholes: create, delete, list, restore; records kept in step.

A wormhole built for another daemon (a remote child) belongs to that daemon: its
id here carries its owner's tag (`ID.OWNER8`), so children of two daemons never
clash, and only records made by this daemon's own users are kept.

A change is recorded before it is made visible, and refused whole when its
record cannot be written or removed (a read-only or full state dir). A record
that cannot be built at start (its container is gone, its port is taken) is
kept, listed with state `failed` and the reason, can be deleted, and is tried
again at the next start."""

from __future__ import annotations

import asyncio
import logging
import uuid

from wormhole.spec import Context, Plan, SpecError, parse, plan

from .errors import DaemonError, Refused
from .places import Places
from .segments import Env, Segment
from .state import RecordError, StateDir, check_wormhole_record

log = logging.getLogger("wormholed")


def owned_id(ident: str, owner: str) -> str:
    """The id a remote child gets on this daemon: its asked-for id and its owner's tag."""
    return f"{ident}.{owner[:8]}"


class Wormholes:
    def __init__(self, state: StateDir, env: Env | None = None):
        self._state = state
        self._env = env or Env(Places())
        self._roots: dict[str, Segment | None] = {}  # None: being built (id reserved)
        self._failed: dict[str, dict] = {}  # id -> {"words", "reason"}: records that could not be restored
        self.restored = self.restore_failed = 0  # records rebuilt / not rebuilt at start (metrics)

    def _taken(self) -> set[str]:
        taken = set(self._failed)
        for ident, root in self._roots.items():
            taken.update(root.plan.chain_ids(ident) if root else [ident])
        return taken

    async def create(self, words: list[str], ident: str | None = None, *, ctx: Context = Context(),
                     save: bool = True, owner: str | None = None, owner_label: str | None = None,
                     tunnel: bool = False, adoptions: dict | None = None) -> dict:
        """Build a wormhole. `owner`: the daemon id whose wormhole this is a remote child of
        (replaced when the same owner asks again: it restarted), shown in `list` as
        `owner_label`; `tunnel`: its head is on
        the overlay address of the tunnel to that owner, which it holds while it lives."""
        try:
            p: Plan = plan(parse(words, child=owner is not None), ctx)
        except SpecError as e:
            raise Refused(str(e)) from None
        root_id = asked_id = ident or p.id or str(uuid.uuid4())
        asked = (tuple(words), ctx, tunnel)
        if owner is not None:
            root_id = owned_id(root_id, owner)
            old = self._roots.get(root_id)
            if old is not None and old.owner == owner:
                if old.asked == asked:
                    # Its parent lost sight of it (a link was down, its daemon restarted) and asks
                    # again for the very same child: the one here still serves, with its connections.
                    log.info("wormhole %s: asked for again by its owner, kept", root_id)
                    return self._created(root_id, old)
                log.info("wormhole %s: replaced at the request of its owner", root_id)
                await self.delete(root_id)
        ids = p.chain_ids(root_id)
        clash = sorted(set(ids) & self._taken()) or sorted({i for i in ids if ids.count(i) > 1})
        if clash:
            raise Refused(f"a wormhole with id {clash[0]!r} already exists")
        self._roots[root_id] = None
        seg = Segment(p, root_id, self._env, owner=owner, adoptions=adoptions)
        seg.owner_label = owner_label
        seg.asked, seg.asked_id = asked, asked_id
        try:
            if tunnel:
                seg.hold(self._env.tunnels.use(owner, root_id))
            await seg.start()
            if save:
                self._state.save(root_id, {"id": root_id, "words": list(words)})
        except RecordError as e:
            del self._roots[root_id]
            await seg.aclose()
            raise Refused(f"wormhole {root_id} not created: {e}") from None
        except BaseException:
            del self._roots[root_id]
            await seg.aclose()
            raise
        self._roots[root_id] = seg
        log.info("wormhole %s: %s -> %s", root_id, seg.head_url, seg.describe()["tail"])
        return self._created(root_id, seg)

    @staticmethod
    def _created(root_id: str, seg: Segment) -> dict:
        return {"id": root_id, "url": seg.head_url, "host": seg.plan.head.host, "port": seg.head_port}

    async def delete(self, ident: str) -> dict:
        if ident in self._failed:
            self._remove_record(ident)
            del self._failed[ident]
            log.info("wormhole %s: deleted (it had failed to restore)", ident)
            return {"id": ident, "warnings": []}
        seg = self._roots.get(ident)
        if seg is None:
            for root_id, root in self._roots.items():
                if root and ident in root.plan.chain_ids(root_id):
                    raise Refused(f"wormhole {ident!r} is part of {root_id!r}: delete {root_id!r}")
            if ident in self._roots:
                raise Refused(f"wormhole {ident!r} is being created: delete it once it is")
            raise Refused(f"no wormhole with id {ident!r}")
        self._remove_record(ident)  # first: a delete that cannot be recorded changes nothing
        del self._roots[ident]
        await seg.aclose()
        log.info("wormhole %s: deleted", ident)
        return {"id": ident, "warnings": seg.warnings}

    def _remove_record(self, ident: str) -> None:
        try:
            self._state.remove(ident)
        except RecordError as e:
            raise Refused(f"wormhole {ident} not deleted: {e}") from None

    def list(self) -> list[dict]:
        rows = [s.describe() for root in self._roots.values() if root for s in root.chain()]
        for ident, failed in self._failed.items():
            rows.append({"id": ident, "parent": None, "child": None, "remote": None, "transport": None,
                         "head": " ".join(failed["words"]), "tail": f"(not restored: {failed['reason']})",
                         "state": "failed", "reason": failed["reason"], "connections": 0, "total": 0,
                         "bytes_in": 0, "bytes_out": 0, "refused": 0, "max_conns": None, "idle_timeout": None})
        return rows

    def forget(self) -> None:
        """Drop every wormhole without tearing anything down: what they held was handed over
        (and is being taken back by adoption)."""
        for root in self.roots():
            for seg in root.chain():
                seg.forget()
        self._roots.clear()

    def roots(self) -> list[Segment]:
        """The wormholes built (not those being built)."""
        return [root for root in self._roots.values() if root is not None]

    def segments(self) -> list[Segment]:
        """Every live segment, roots and their children (what `list` describes)."""
        return [s for root in self._roots.values() if root for s in root.chain()]

    def failed_count(self) -> int:
        """Records listed as failed (not restored, not deleted since)."""
        return len(self._failed)

    async def restore(self, skip: frozenset[str] = frozenset()) -> None:
        """Rebuild the wormholes recorded by an earlier run (listening again, triggers armed);
        those that cannot be built are kept as failed (listed, deletable, tried at the next start).
        `skip`: ids a predecessor handed over (built already)."""
        for record in self._state.load(check=check_wormhole_record):
            ident, words = record["id"], record["words"]
            if ident in skip:
                continue
            try:
                await self.create(words, ident, save=False)
                self.restored += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever it was, the daemon starts and the record stays
                reason = str(e) if isinstance(e, DaemonError) else f"{type(e).__name__}: {e}"
                log.error("could not restore wormhole %s: %s (listed as failed; tried again at the "
                          "next start, or delete it)", ident, reason)
                self._roots.pop(ident, None)
                self._failed[ident] = {"words": list(words), "reason": reason}
                self.restore_failed += 1

    async def aclose(self) -> None:
        """Tear down every wormhole; their records stay for the next start."""
        roots, self._roots = self._roots, {}
        for root in roots.values():
            if root:
                await root.aclose()
