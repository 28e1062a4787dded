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
    def __init__(self, docker: Docker | None = None, cri_socket: str | None = None):
        """cri_socket: the container runtime's CRI socket, asked for k8s-ns places (None:
        this daemon finds no pods). Its client (cri.py, the optional `k8s` extra) is loaded
        on the first k8s-ns place."""
        self._docker = docker
        self._cri_socket = cri_socket
        self._cri = None

    def close(self) -> None:
        """The daemon stops: let go of the container runtime's channel, if a lookup made one."""
        if self._cri is not None:
            self._cri.close()

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
        elif place.kind == "k8s-ns":
            ns = (await self.pod(place))[1]
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

    async def pod(self, place: Place) -> tuple[str, Netns]:
        """(sandbox id, its namespace, opened) of a k8s-ns place's pod, found now through the
        container runtime (CRI); the caller closes the namespace."""
        from .cri import Cri, CriError

        if self._cri_socket is None:
            raise Refused(f"{place}: this wormholed has no container runtime to ask (--cri-socket)")
        if self._cri is None:
            self._cri = Cri(self._cri_socket)
        namespace, name = place.arg.split("/", 1)
        try:
            sandbox, path, pid = await self._cri.pod_netns(namespace, name)
            # The runtime spec's path; the sandbox process's namespace where that path is not
            # one here: a bind mount made after this daemon's mount namespace was copied is not
            # in it unless / is a shared mount (or /run/netns is mounted HostToContainer).
            try:
                ns = Netns.at(path, f"pod {place.arg}") if path else Netns.of_pid(pid)
            except NetnsError:
                if not pid:
                    raise
                ns = Netns.of_pid(pid)
        except (CriError, NetnsError) as e:
            raise Refused(str(e)) from None
        ns.prefix = f"k8s:{place.arg}@"
        return sandbox, ns

    def follower(self, place: Place, stack: contextlib.AsyncExitStack, first: Netns) -> PodFollower:
        """For a k8s-ns tail: `async with resolve() as ns` gives the pod's namespace for one dial,
        looked up again every time (a recreated pod is a new sandbox with a new namespace);
        `first` is the one open() gave. A namespace the pod left is closed once the last dial
        using it ends; the one in use when `stack` closes, then."""
        follow = PodFollower(self, place, first)
        stack.callback(follow.close)
        return follow


class PodFollower:
    """A k8s-ns tail's namespace, per dial (Places.follower). Each one it opened stays open while
    a dial uses it (a worker thread may be making a socket in it) or while it is the pod's."""

    def __init__(self, places: Places, place: Place, first: Netns):
        self._places, self._place = places, place
        self._ns: Netns | None = first  # the pod's namespace as last found; None once closed
        self._sandbox: str | None = None  # its sandbox, once a lookup said
        self._users: dict[int, int] = {}  # id(namespace) -> dials using it

    @contextlib.asynccontextmanager
    async def __call__(self):
        sandbox, ns = await self._places.pod(self._place)
        current = self._ns
        if current is not None:  # else the tail is closing: ns is closed after this dial
            if sandbox == self._sandbox or (self._sandbox is None and ns == current):
                ns.close()  # the pod as it was (on the first lookup: the namespace open() gave)
                ns = current
            else:  # a new pod
                self._ns = ns
                self._let_go(current)
            self._sandbox = sandbox
        self._users[id(ns)] = self._users.get(id(ns), 0) + 1
        try:
            yield ns
        finally:
            self._users[id(ns)] -= 1
            if not self._users[id(ns)]:
                del self._users[id(ns)]
            if ns is not self._ns:
                self._let_go(ns)

    def _let_go(self, ns: Netns) -> None:
        """ns is no longer the pod's (or the tail is closing): closed unless a dial still uses it."""
        if id(ns) not in self._users:
            ns.close()

    def close(self) -> None:
        ns, self._ns = self._ns, None
        if ns is not None:
            self._let_go(ns)
