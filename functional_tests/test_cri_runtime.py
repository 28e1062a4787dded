"""wormholed/cri.py against a real container runtime: containerd 1.6 with its CRI plugin
(functional_tests/containerd.py), pods run over CRI as a kubelet would. The client finds a
pod's network namespace, a server in the pod answers there, a recreated pod is found anew,
and the refusals are one line each."""

import asyncio
import os
import socket
import threading
import time

import pytest

from containerd import Pod, running
from wormholed.cri import Cri, CriError
from wormholed.netns import Netns, make_socket


@pytest.fixture(scope="module")
def ctd():
    with running() as c:
        yield c


def lookup(ctd, namespace, name, socket_path=None):
    return asyncio.run(Cri(socket_path or ctd.socket).pod_netns(namespace, name))


def echo_in(netns_path: str, host: str, data: bytes) -> bytes:
    """Connect to host:80 from inside the namespace at netns_path (a socket made there as the
    daemon makes them); send data, return the echo. The pod's server may not listen yet
    (StartContainer returns before its nc binds): a refused connect is tried again for 15 s."""
    deadline = time.monotonic() + 15
    while True:
        with Netns(os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC), "pod") as ns:
            s = asyncio.run(make_socket(ns, socket.AF_INET, socket.SOCK_STREAM))
        s.setblocking(True)
        s.settimeout(15)
        try:
            s.connect((host, 80))
            break
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with s:
        sender = threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        sender.join()
        return bytes(got)


def ns_inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_a_pod_is_found_followed_when_recreated_and_refused_when_gone(ctd):
    pod = ctd.run_pod("demo", "web")
    sandbox_id, path, pid = lookup(ctd, "demo", "web")
    assert sandbox_id == pod.sandbox_id and path and pid
    server = int(ctd.ctr("tasks", "ls").split(pod.container_id)[1].split()[0])
    assert ns_inode(path) == ns_inode(f"/proc/{server}/ns/net"), "the server container's namespace"
    assert ns_inode(path) == ns_inode(f"/proc/{pid}/ns/net"), "the sandbox's pid: the same namespace"
    assert ns_inode(path) != ns_inode("/proc/self/ns/net")
    data = os.urandom(1 << 20)
    assert echo_in(path, "127.0.0.1", data) == data
    assert echo_in(path, "10.88.0.2", b"eth0 too") == b"eth0 too"

    ctd.remove_pod(pod)
    with pytest.raises(CriError, match=r"^no running pod demo/web on this node \(no pod sandboxes here\)$"):
        lookup(ctd, "demo", "web")
    again = ctd.run_pod("demo", "web", attempt=1)
    sandbox_id2, path2, _ = lookup(ctd, "demo", "web")
    assert sandbox_id2 == again.sandbox_id != sandbox_id
    assert path2 != path and not os.path.exists(path)
    assert echo_in(path2, "127.0.0.1", b"the new pod") == b"the new pod"
    ctd.remove_pod(again)


def test_the_newest_ready_sandbox_wins_and_a_stopped_pod_is_refused(ctd):
    old = ctd.run_pod("demo", "api")
    ctd.runtime.StopPodSandbox(ctd.api.StopPodSandboxRequest(pod_sandbox_id=old.sandbox_id), timeout=60)
    with pytest.raises(CriError, match=r"^no running pod demo/api on this node \(1 sandbox\(es\) of it, none ready\)$"):
        lookup(ctd, "demo", "api")
    new = ctd.run_pod("demo", "api", attempt=1)
    other = ctd.run_pod("other", "api")  # same name, another namespace
    sandbox_id, path, _ = lookup(ctd, "demo", "api")
    assert sandbox_id == new.sandbox_id
    assert lookup(ctd, "other", "api")[0] == other.sandbox_id
    for pod in (old, new, other):
        ctd.remove_pod(pod)


def test_refusals(ctd, tmp_path):
    host = ctd.run_pod("demo", "hostnet", host_network=True)
    with pytest.raises(CriError, match=r"^pod demo/hostnet uses the host's network \(hostNetwork\)"):
        lookup(ctd, "demo", "hostnet")
    ctd.remove_pod(host)
    with pytest.raises(CriError, match=r"^no running pod demo/missing on this node"):
        lookup(ctd, "demo", "missing")

    missing = tmp_path / "no.sock"
    with pytest.raises(CriError) as e:
        lookup(ctd, "demo", "web", str(missing))
    assert str(e.value) == f"cannot reach the container runtime at {missing}: No such file or directory"
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # a socket nobody listens on
        with pytest.raises(CriError) as e:
            lookup(ctd, "demo", "web", str(dead))
    assert str(e.value) == f"cannot reach the container runtime at {dead}: Connection refused"


def test_one_channel_kept_through_runtime_restarts_and_a_crash(ctd):
    """A Cri keeps one channel for all its lookups. containerd restarted: the next lookup finds
    the pod (still running). containerd killed and down for a few seconds while lookups keep
    coming (each refused), then started: the very next lookup finds the pod, though the kept
    channel is waiting out a reconnect backoff longer than the restart took by then (it fails at
    once with UNAVAILABLE, and the call is made again on a new channel). close() lets it go."""
    pod = ctd.run_pod("demo", "steady")
    cri = Cri(ctd.socket)

    def find():
        return asyncio.run(cri.pod_netns("demo", "steady"))

    try:
        first = find()
        assert first[0] == pod.sandbox_id
        channel = cri._channel
        assert find() == first and cri._channel is channel, "one channel for every lookup"
        ctd.restart()
        assert find() == first
        ctd.crash()
        down = time.monotonic() + 3
        while time.monotonic() < down:
            with pytest.raises(CriError, match=r"^cannot reach the container runtime at .*: Connection refused$"):
                find()
            time.sleep(0.2)
        ctd.restart()
        assert find() == first
    finally:
        cri.close()
        if ctd.proc.poll() is not None:  # for the tests after this one
            ctd.restart()
    assert cri._channel is None
    ctd.remove_pod(pod)


def test_cleanup_leaves_nothing(tmp_path):
    """A second containerd, closed with a pod still running: its shims, mounts, cgroups and
    directory are gone afterwards."""
    with running() as c:
        pod: Pod = c.run_pod("demo", "left")
        base, cgroup, path = c.base, c.cgroup, lookup(c, "demo", "left")[1]
    assert not base.exists()
    with open("/proc/self/mountinfo") as f:
        assert str(base) not in f.read()
    assert not os.path.exists(path)
    assert not any(os.path.exists(f"/sys/fs/cgroup/{ctl}{cgroup}") for ctl in os.listdir("/sys/fs/cgroup"))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            assert pod.sandbox_id.encode() not in cmd and str(base).encode() not in cmd
