"""Kubernetes pods on this node, found through the container runtime's CRI API (`k8s-ns`).

A kubelet runs pods through the CRI API of the node's container runtime (containerd,
CRI-O) over a unix socket, and the same API tells where a pod lives: no Kubernetes API
server, credentials or kubelet are needed, only root on the node and the socket. A pod's
network namespace is its sandbox's: `ListPodSandbox` gives the sandboxes (the newest READY
one of NAMESPACE/NAME is the pod as it runs now; older attempts linger NOTREADY until the
kubelet removes them), and `PodSandboxStatus(verbose=true)` gives, in `info["info"]`, the
runtime's own JSON about it, with the OCI runtime spec the sandbox was started with. Its
`linux.namespaces` entry of type "network" has the path of the namespace (a bind mount
such as /var/run/netns/cni-...), in containerd 1.6 and 2.x alike (and CRI-O). The sandbox
process's pid comes with it: /proc/PID/ns/net is the same namespace, and it is the one way
in where the path is not visible, in a mount namespace made before the runtime bound the
path (a daemon in a container, a test host here: "/" is not a shared mount, so the bind
mount does not propagate), or where the entry has no path at all.

A pod is resolved again for each connection: a deleted and recreated pod is another
sandbox with another namespace, and the next connection follows it.

The CRI client is an optional extra (`pip install 'ns-wormhole[k8s]'`: PyPI's
container-runtime-interface-api, generated v1 stubs, with grpcio and protobuf), imported
on first use, so a daemon without it starts and only `k8s-ns` says what is missing. gRPC's
synchronous client runs on a worker thread, with a deadline on every call. Lookups are one
per new connection, so a `Cri` keeps one channel (made on the first lookup, closed by
`close()` when the daemon stops) rather than connecting anew each time. A channel kept
across a runtime restart may sit in reconnect backoff, failing every call at once with
UNAVAILABLE: such a call is made once more on a new channel, which connects now.

`pick_sandbox` and `netns_of` are pure, so the choice and the refusals are tested on
recorded runtime output (unit_tests/data/cri_*.json).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import threading

__all__ = ["CriError", "Cri", "pick_sandbox", "netns_of", "DEFAULT_SOCKET", "INSTALL_HINT"]

DEFAULT_SOCKET = "/run/containerd/containerd.sock"
INSTALL_HINT = "k8s-ns needs the CRI client: pip install 'ns-wormhole[k8s]'"
READY = "SANDBOX_READY"
HOST_NETNS = ("/proc/1/ns/net", "/proc/self/ns/net")
_NODE = (2, "NODE")  # NamespaceMode NODE, as an int (Go's encoding/json) or a name


class CriError(Exception):
    """A pod that cannot be reached; str() is one line for the user."""


def pick_sandbox(items: list[dict], namespace: str, name: str) -> dict:
    """The pod NAMESPACE/NAME as it runs now: among ListPodSandbox items (dicts with id,
    metadata {name, namespace, uid, attempt}, state, created_at), the newest READY one."""
    pod = f"{namespace}/{name}"
    mine = [s for s in items
            if (s.get("metadata") or {}).get("namespace") == namespace and (s.get("metadata") or {}).get("name") == name]
    ready = [s for s in mine if s.get("state") == READY]
    if not ready:
        if mine:
            why = f"{len(mine)} sandbox(es) of it, none ready"
        else:
            why = f"none of the {len(items)} pod sandbox(es) here" if items else "no pod sandboxes here"
        raise CriError(f"no running pod {pod} on this node ({why})")
    return max(ready, key=lambda s: (int(s.get("created_at") or 0), int((s.get("metadata") or {}).get("attempt") or 0)))


def _pod_label(info: dict) -> str:
    meta = ((info.get("config") or {}).get("metadata") or {})
    if meta.get("name"):
        return f"pod {meta.get('namespace', '')}/{meta['name']}"
    return "the pod"


def netns_of(info: dict) -> tuple[str | None, int | None]:
    """(network namespace path, sandbox pid) from PodSandboxStatus's verbose info (info["info"],
    decoded). Either may be None, not both: the path when the namespace entry has none, the pid
    when the info has none (or 0: the sandbox process is gone)."""
    pod = _pod_label(info)
    spec = info.get("runtimeSpec")
    if not isinstance(spec, dict):
        got = ", ".join(sorted(info)) or "nothing"
        runtime = info.get("runtimeType") or info.get("runtimeHandler")
        runtime = f" from {runtime}" if runtime else ""
        raise CriError(f"{pod}: the container runtime's sandbox info{runtime} has no runtimeSpec "
                       f"to find its network namespace in (it has: {got})")
    options = (((info.get("config") or {}).get("linux") or {}).get("security_context") or {}).get("namespace_options") or {}
    namespaces = ((spec.get("linux") or {}).get("namespaces")) or []
    network = [n for n in namespaces if isinstance(n, dict) and n.get("type") == "network"]
    if options.get("network") in _NODE or not network:
        raise CriError(f"{pod} uses the host's network (hostNetwork): it has no network namespace of its own")
    path = network[0].get("path") or None
    if path in HOST_NETNS:
        raise CriError(f"{pod} uses the host's network namespace ({path})")
    pid = info.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
    if path or pid:
        return path, pid
    raise CriError(f"{pod}: the container runtime's sandbox info has neither a network namespace path nor a pid")


def _load():
    try:
        import grpc
        from cri_api.v1 import api_pb2, api_pb2_grpc
    except ImportError as e:
        raise CriError(f"{INSTALL_HINT} ({e})") from None
    except Exception as e:  # protobuf's runtime version check, a grpcio too old for the stubs
        raise CriError(f"{INSTALL_HINT} (the installed one does not load: {e})") from None
    return grpc, api_pb2, api_pb2_grpc


class Cri:
    """The CRI API of the container runtime listening on unix socket `socket_path`."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._lock = threading.Lock()  # lookups run on worker threads
        self._channel = None  # and its RuntimeServiceStub, once a lookup made them
        self._runtime = None

    def close(self) -> None:
        """Close the channel (calls still under way on it fail); a later lookup makes another."""
        with self._lock:
            channel, self._channel, self._runtime = self._channel, None, None
        if channel is not None:
            channel.close()

    async def pod_netns(self, namespace: str, name: str) -> tuple[str, str | None, int | None]:
        """(sandbox id, network namespace path, sandbox pid) of pod NAMESPACE/NAME as it runs now;
        path or pid may be None, not both (see netns_of). CriError otherwise."""
        if not namespace or not name:
            raise CriError(f"invalid pod {namespace}/{name}: k8s-ns takes NAMESPACE/POD")
        return await asyncio.to_thread(self._pod_netns, namespace, name)

    def _unreachable(self, why: str) -> CriError:
        return CriError(f"cannot reach the container runtime at {self.socket_path}: {why}")

    def _stub(self, grpc, stubs, stale=None):
        """(channel, RuntimeServiceStub): the kept ones, made now if there are none, or if the
        kept channel is `stale` (closed here, unless another thread replaced it already)."""
        with self._lock:
            if stale is not None and self._channel is stale:
                self._channel, self._runtime = None, None
                stale.close()
            if self._channel is None:
                # Subchannels of its own: a new channel does not inherit another's reconnect backoff.
                self._channel = grpc.insecure_channel(f"unix://{os.path.abspath(self.socket_path)}",
                                                      options=[("grpc.use_local_subchannel_pool", 1)])
                self._runtime = stubs.RuntimeServiceStub(self._channel)
            return self._channel, self._runtime

    def _call(self, grpc, stubs, method: str, request):
        """RuntimeService `method` on the kept channel; on UNAVAILABLE once more, on a new channel
        (the runtime restarted: the old one may be waiting out its reconnect backoff)."""
        channel, runtime = self._stub(grpc, stubs)
        try:
            return getattr(runtime, method)(request, timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        channel, runtime = self._stub(grpc, stubs, stale=channel)
        return getattr(runtime, method)(request, timeout=self.timeout)

    def _pod_netns(self, namespace: str, name: str) -> tuple[str, str | None, int | None]:
        grpc, api, stubs = _load()
        try:
            if not stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                raise self._unreachable("not a socket")
        except OSError as e:
            raise self._unreachable(e.strerror or str(e)) from None
        try:
            listed = self._call(grpc, stubs, "ListPodSandbox", api.ListPodSandboxRequest())
        except grpc.RpcError as e:
            raise self._rpc_error(grpc, "ListPodSandbox", e) from None
        state = api.PodSandboxState.Name
        items = [{"id": s.id, "state": state(s.state), "created_at": s.created_at,
                  "metadata": {"name": s.metadata.name, "namespace": s.metadata.namespace,
                               "uid": s.metadata.uid, "attempt": s.metadata.attempt}}
                 for s in listed.items]
        sandbox = pick_sandbox(items, namespace, name)
        try:
            status = self._call(grpc, stubs, "PodSandboxStatus",
                                api.PodSandboxStatusRequest(pod_sandbox_id=sandbox["id"], verbose=True))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # removed between the two calls
                raise CriError(f"no running pod {namespace}/{name} on this node (its sandbox just went)") from None
            raise self._rpc_error(grpc, "PodSandboxStatus", e) from None
        raw = status.info.get("info")
        if raw is None:
            keys = ", ".join(sorted(status.info)) or "none"
            raise CriError(f"pod {namespace}/{name}: the container runtime gave no verbose sandbox info "
                           f"(info keys: {keys})")
        try:
            info = json.loads(raw)
        except ValueError as e:
            raise CriError(f"pod {namespace}/{name}: the container runtime's sandbox info is not JSON: {e}") from None
        if not isinstance(info, dict):
            raise CriError(f"pod {namespace}/{name}: the container runtime's sandbox info is not a JSON object")
        config = info.get("config") if isinstance(info.get("config"), dict) else {}
        if not (config.get("metadata") or {}).get("name"):  # for netns_of's messages
            info = {**info, "config": {**config, "metadata": {"namespace": namespace, "name": name}}}
        path, pid = netns_of(info)
        return sandbox["id"], path, pid

    def _rpc_error(self, grpc, call: str, e) -> CriError:
        code, details = e.code(), (e.details() or "").strip()
        if code == grpc.StatusCode.UNAVAILABLE:
            m = re.search(r"(Connection refused|No such file or directory|Permission denied)", details)
            return self._unreachable(m.group(1) if m else details or "unavailable")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._unreachable(f"no answer to {call} in {self.timeout:g} s")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return CriError(f"the container runtime at {self.socket_path} does not serve the CRI v1 API "
                            f"({call}: {details or 'unimplemented'}; containerd needs its CRI plugin on)")
        return CriError(f"container runtime at {self.socket_path}: {call}: {details or code.name}")
