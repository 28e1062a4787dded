"""k8s-ns NAMESPACE/POD through a real container runtime: containerd 1.6 with its CRI plugin
(functional_tests/containerd.py) running pods as a kubelet would, and a test host's
wormholed asking it (--cri-socket) where a pod's network namespace is."""

import os
import socket
import time

import pytest

from containerd import running
from harness import SLOW, cmdline, recv_all


@pytest.fixture(scope="module")
def ctd():
    with running() as c:
        yield c


def echo(host, port, data):
    with host.connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_a_pods_port_through_a_wormhole_followed_when_the_pod_is_recreated(make_host, ctd):
    h = make_host(args=("--cri-socket", ctd.socket))
    pod = ctd.run_pod("demo", "web")
    ident, url = h.create("url", ":8700", "tail", "k8s-ns", "demo/web", "url", ":80")
    data = os.urandom(1 << 20)
    assert echo(h, 8700, data) == data, "1 MiB both ways, with the half-close"
    [row] = h.list()
    assert row["tail"] == "tcp://k8s:demo/web@127.0.0.1:80"
    assert row["bytes_in"] == row["bytes_out"] == len(data)
    held = h.connect(8700)
    held.sendall(b"old pod ")
    ctd.remove_pod(pod)  # deleted and made again, as a Deployment does: a new sandbox, a new namespace
    new = ctd.run_pod("demo", "web", attempt=1)
    assert new.sandbox_id != pod.sandbox_id
    for _ in range(3):
        assert echo(h, 8700, b"new pod") == b"new pod", "new connections reach the new pod"
    try:
        held.sendall(b"gone")
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) in (b"", b"old pod ", b"old pod gone")
    except OSError:
        pass  # the old pod's end went with it
    h.ok("delete", ident)
    ctd.remove_pod(new)


def test_recreating_the_pod_leaves_no_namespace_open_behind(make_host, ctd):
    """Each recreation gives the tail a new namespace; the one it replaced is closed (with the
    sockets made ahead in it) once no dial uses it: the daemon's fds do not grow with them."""
    h = make_host(args=("--cri-socket", ctd.socket))
    assert cmdline(h.daemon.pid)[1].endswith("wormholed"), "nsenter execs the daemon"
    fds = f"/proc/{h.daemon.pid}/fd"
    pod = ctd.run_pod("demo", "churn")
    ident, _ = h.create("url", ":8740", "tail", "k8s-ns", "demo/churn", "url", ":80")

    def recreate(pod, attempt):
        ctd.remove_pod(pod)
        pod = ctd.run_pod("demo", "churn", attempt=attempt)
        assert echo(h, 8740, b"pod %d" % attempt) == b"pod %d" % attempt
        return pod

    pod = recreate(pod, 1)  # once, so that the tail has followed a recreation already
    before = len(os.listdir(fds))
    for attempt in range(2, 6):
        pod = recreate(pod, attempt)
    deadline = time.monotonic() + 5 * SLOW  # the last connection's sockets closing
    while (now := len(os.listdir(fds))) > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert now < before + 4, f"{now - before} more open fds after 4 recreations of the pod"
    h.ok("delete", ident)
    ctd.remove_pod(pod)


def test_a_missing_or_host_network_pod_is_refused_and_nothing_is_made(make_host, ctd):
    h = make_host(args=("--cri-socket", ctd.socket))
    r = h.wormhole("create", "url", ":8710", "tail", "k8s-ns", "demo/missing", "url", ":80")
    assert r.returncode == 1 and "no running pod demo/missing on this node" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert h.list() == [] and not h.listening(8710)
    pod = ctd.run_pod("demo", "hostnet", host_network=True)
    r = h.wormhole("create", "url", ":8711", "tail", "k8s-ns", "demo/hostnet", "url", ":80")
    assert r.returncode == 1 and "uses the host's network" in r.stderr
    assert h.list() == []
    ctd.remove_pod(pod)
    r = h.wormhole("create", "url", ":8712", "tail", "k8s-ns", "Demo/x", "url", ":80")
    assert r.returncode == 2 and "bad pod 'Demo/x'" in r.stderr


def test_trigger_k8s_ns_waits_for_the_pod_and_a_daemon_without_a_runtime_says_so(make_host, ctd, tmp_path):
    h = make_host(args=("--cri-socket", ctd.socket))
    h.create("id", "later", "url", ":8720", "trigger", "k8s-ns", "demo/later", "url", ":80")
    with pytest.raises(OSError):
        echo(h, 8720, b"too early")  # the trigger fails: no such pod yet; the next connection tries again
    pod = ctd.run_pod("demo", "later")
    assert echo(h, 8720, b"now") == b"now"
    ctd.remove_pod(pod)
    other = make_host(args=("--cri-socket", str(tmp_path / "none.sock")))
    r = other.wormhole("create", "url", ":8721", "tail", "k8s-ns", "demo/web", "url", ":80")
    assert r.returncode == 1 and "cannot reach the container runtime at" in r.stderr


def test_a_tunnel_to_a_pod_on_another_node(make_host, ctd):
    """Between nodes as between hosts: `url :8080 tunnel NODE-IP tail k8s-ns NS/POD url :80`,
    the child on the pod's node finding the pod there."""
    from harness import veth

    h1 = make_host(key="k8s-key")
    h2 = make_host(key="k8s-key", args=("--cri-socket", ctd.socket))
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    pod = ctd.run_pod("shop", "web")
    try:
        h1.create("id", "shop", "url", ":8730", "tunnel", "192.0.2.2", "tail", "k8s-ns", "shop/web", "url", ":80")
        data = os.urandom(1 << 20)
        assert echo(h1, 8730, data) == data
        [child] = h2.list()
        assert child["tail"] == "tcp://k8s:shop/web@127.0.0.1:80" and child["transport"] is None
        h1.ok("delete", "shop")
        h1.ok("tunnel-delete", "192.0.2.2")
    finally:
        ctd.remove_pod(pod)
