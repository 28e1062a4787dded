"""Containers through the Docker Engine API (the docker SDK; DOCKER_HOST as the CLI reads it):
the network namespace of a running container, and containers that wormholes start and remove.

The SDK blocks, so every call runs on a worker thread. Containers a daemon
starts carry its id in a label, so that after a crash the next start finds
and removes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

import docker
from docker.errors import DockerException, ImageNotFound, NotFound

from wormhole.docker_args import RunSpec
from .errors import Failed, Refused

from .netns import Netns, NetnsError

log = logging.getLogger("wormholed")
LABEL_DAEMON = "org.wormhole.daemon"
LABEL_WORMHOLE = "org.wormhole.wormhole"
API_TIMEOUT = 60


def _engine() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _reason(e: DockerException) -> str:
    return getattr(e, "explanation", None) or str(e)


class Docker:
    def __init__(self, daemon_id: str):
        self.daemon_id = daemon_id
        self._client: docker.DockerClient | None = None

    def _api(self) -> docker.DockerClient:
        if self._client is None:
            try:
                self._client = docker.from_env(timeout=API_TIMEOUT)
            except DockerException as e:
                raise Failed(f"cannot reach the Docker engine at {_engine()}: {_reason(e)}") from None
        return self._client

    async def _call(self, what: str, fn, *args, **kw):
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        except (Refused, Failed):
            raise
        except DockerException as e:
            raise Failed(f"docker: {what}: {_reason(e)}") from None
        except OSError as e:  # requests' ConnectionError is an OSError
            raise Failed(f"cannot reach the Docker engine at {_engine()}: {e}") from None

    async def netns(self, ident: str) -> Netns:
        """The network namespace of running container `ident` (id or name)."""
        def get():
            try:
                return self._api().containers.get(ident)
            except NotFound:
                raise Refused(f"no container {ident!r}") from None
        container = await self._call(f"inspect {ident}", get)
        return _netns_of(container, ident)

    async def run(self, spec: RunSpec, wormhole_id: str) -> tuple[str, Netns]:
        """`docker run -d`: create, start, and return (container id, its namespace)."""
        labels = dict(label.partition("=")[::2] for label in spec.labels)
        labels.update({LABEL_DAEMON: self.daemon_id, LABEL_WORMHOLE: wormhole_id})

        def run():
            api = self._api()
            try:
                container = api.containers.create(
                    spec.image, list(spec.command) or None, name=spec.name, environment=list(spec.env),
                    volumes=list(spec.volumes), working_dir=spec.workdir, user=spec.user,
                    entrypoint=spec.entrypoint, labels=labels, auto_remove=spec.remove, detach=True)
            except ImageNotFound:
                raise Refused(f"docker-run: no image {spec.image!r} here "
                              f"(wormhole does not pull; load or build it first)") from None
            try:
                container.start()
                container.reload()
                return container.id, _netns_of(container, spec.name or container.short_id)
            except BaseException:
                _remove(container)
                raise
        started = asyncio.ensure_future(self._call(f"run {spec.image}", run))
        try:
            cid, ns = await asyncio.shield(started)
        except asyncio.CancelledError:
            # Deleted while the engine starts it: the thread goes on, so wait and undo.
            with contextlib.suppress(Exception):
                cid, ns = await started
                ns.close()
                await self.remove(cid)
            raise
        log.info("wormhole %s: started container %s (%s)", wormhole_id, cid[:12], spec.image)
        return cid, ns

    async def remove(self, cid: str) -> None:
        def remove():
            try:
                _remove(self._api().containers.get(cid))
            except NotFound:
                pass
        try:
            await self._call(f"remove {cid[:12]}", remove)
        except (Failed, Refused) as e:
            log.error("could not remove container %s: %s", cid[:12], e)

    async def remove_strays(self, timeout: float = 10, keep: frozenset[str] = frozenset()) -> int:
        """Remove containers this daemon started and did not remove (it died), but those in
        `keep` (ids: a predecessor's, handed over with their wormholes)."""
        def sweep():
            found = self._api().containers.list(all=True, filters={"label": f"{LABEL_DAEMON}={self.daemon_id}"})
            found = [c for c in found if c.id not in keep]
            for container in found:
                _remove(container)
            return len(found)
        try:
            count = await asyncio.wait_for(self._call("list", sweep), timeout)
        except (Failed, TimeoutError) as e:
            log.debug("no stray sweep: %s", e or "the Docker engine did not answer")
            return 0
        if count:
            log.info("removed %d stray container(s) left by an earlier run", count)
        return count


def _netns_of(container, ident: str) -> Netns:
    state = container.attrs.get("State", {})
    if not state.get("Running") or not state.get("Pid"):
        raise Refused(f"container {ident!r} is not running")
    try:
        ns = Netns.of_pid(state["Pid"])
    except NetnsError as e:
        raise Failed(f"container {ident!r}: {e}") from None
    ns.label = ns.prefix = f"docker:{container.name}"
    ns.prefix += "@"
    return ns


def _remove(container) -> None:
    try:
        container.remove(force=True)
    except NotFound:
        pass
