"""k8s-ns's pod lookup (wormholed/cri.py) on recorded container-runtime output.

unit_tests/data/cri_containerd16_*.json are PodSandboxStatus(verbose=true) info["info"] of
Debian's containerd 1.6.20, recorded from the tests' own containerd
(`python functional_tests/containerd.py unit_tests/data`): a pod, and a host-network pod.
cri_containerd2_*.json are written in containerd 2.x's format (its SandboxInfo struct,
internal/cri/server/podsandbox/types/sandbox_info.go): the same runtimeSpec, no top-level
runtimeHandler, and a sandboxMetadata object (Go field names: ID, NetNSPath...) besides; as a
kubelet's pod would look (systemd cgroups, /var/run/netns); and the info 2.x gives for a
sandbox whose controller lost it (no runtimeSpec)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wormholed.cri import Cri, CriError, INSTALL_HINT, netns_of, pick_sandbox

DATA = Path(__file__).parent / "data"


def info(name):
    return json.loads((DATA / f"cri_{name}.json").read_text())


def sandbox(sid, namespace="demo", name="web", state="SANDBOX_READY", created_at=1, attempt=0):
    return {"id": sid, "state": state, "created_at": created_at,
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{sid}", "attempt": attempt}}


# ---- netns_of

def test_containerd16_pod():
    recorded = info("containerd16_pod")
    path, pid = netns_of(recorded)
    assert pid == recorded["pid"] > 0
    assert path.endswith(recorded["cniResult"]["Interfaces"]["eth0"]["Sandbox"].rsplit("/", 1)[1])
    assert "/netns/cni-" in path


def test_containerd2_pod():
    recorded = info("containerd2_pod")
    assert "runtimeHandler" not in recorded and "sandboxMetadata" in recorded
    assert netns_of(recorded) == ("/var/run/netns/cni-5b2f0c1e-8d3a-4f6b-9c7e-1a2b3c4d5e6f", 48213)
    assert netns_of(recorded)[0] == recorded["sandboxMetadata"]["NetNSPath"]


@pytest.mark.parametrize("name, pod", [("containerd16_hostnet", "demo/hostweb"),
                                       ("containerd2_hostnet", "monitoring/node-exporter-x7k2p")])
def test_a_host_network_pod_is_refused(name, pod):
    with pytest.raises(CriError) as e:
        netns_of(info(name))
    assert str(e.value) == f"pod {pod} uses the host's network (hostNetwork): it has no network namespace of its own"


def test_a_spec_without_a_network_namespace_is_host_network_even_unsaid():
    recorded = info("containerd16_pod")
    recorded["runtimeSpec"]["linux"]["namespaces"] = [n for n in recorded["runtimeSpec"]["linux"]["namespaces"]
                                                      if n["type"] != "network"]
    with pytest.raises(CriError, match=r"^pod demo/web uses the host's network \(hostNetwork\)"):
        netns_of(recorded)


def test_the_hosts_own_namespace_is_refused():
    recorded = info("containerd2_pod")
    recorded["runtimeSpec"]["linux"]["namespaces"][-1]["path"] = "/proc/1/ns/net"
    with pytest.raises(CriError, match=r"^pod demo/web uses the host's network namespace \(/proc/1/ns/net\)$"):
        netns_of(recorded)


def test_no_path_leaves_the_sandbox_pid_and_no_pid_the_path():
    recorded = info("containerd16_pod")
    path = netns_of(recorded)[0]
    for pid in (0, None, True, "12"):
        assert netns_of({**recorded, "pid": pid}) == (path, None)
    for ns in recorded["runtimeSpec"]["linux"]["namespaces"]:
        ns.pop("path", None)
    assert netns_of(recorded) == (None, recorded["pid"])
    recorded["pid"] = 0
    with pytest.raises(CriError, match="neither a network namespace path nor a pid"):
        netns_of(recorded)


def test_info_without_a_runtime_spec_is_refused_saying_what_it_got():
    with pytest.raises(CriError) as e:
        netns_of(info("containerd2_deleted"))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("pod demo/web: the container runtime's sandbox info has no runtimeSpec")
    assert "it has: cniResult, config, image, netNamespaceClosed, pid" in msg and "sandboxMetadata" in msg
    other = {"pid": 7, "runtimeType": "io.containerd.kata.v2", "config": {"metadata": {"namespace": "a", "name": "b"}}}
    with pytest.raises(CriError, match=r"^pod a/b: the container runtime's sandbox info from io.containerd.kata.v2 "
                                       r"has no runtimeSpec .*\(it has: config, pid, runtimeType\)$"):
        netns_of(other)
    with pytest.raises(CriError, match=r"^the pod: .*\(it has: nothing\)$"):
        netns_of({})


# ---- pick_sandbox

def test_the_newest_ready_sandbox_of_that_namespace_and_name():
    items = [sandbox("old", created_at=100, state="SANDBOX_NOTREADY"),
             sandbox("a", created_at=200),
             sandbox("b", created_at=300, attempt=1),
             sandbox("later-but-stopped", created_at=400, state="SANDBOX_NOTREADY", attempt=2),
             sandbox("other-ns", namespace="prod", created_at=500),
             sandbox("other-name", name="web-2", created_at=600),
             sandbox("prefix", name="we", created_at=700)]
    assert pick_sandbox(items, "demo", "web")["id"] == "b"
    assert pick_sandbox(items, "prod", "web")["id"] == "other-ns"
    assert pick_sandbox(items, "demo", "web-2")["id"] == "other-name"
    # the same creation time: the higher attempt
    assert pick_sandbox([sandbox("x", attempt=3), sandbox("y", attempt=1)], "demo", "web")["id"] == "x"


def test_no_running_pod():
    items = [sandbox("stopped", state="SANDBOX_NOTREADY"), sandbox("elsewhere", namespace="prod")]
    with pytest.raises(CriError) as e:
        pick_sandbox(items, "demo", "web")
    assert str(e.value) == "no running pod demo/web on this node (1 sandbox(es) of it, none ready)"
    with pytest.raises(CriError) as e:
        pick_sandbox(items, "demo", "api")
    assert str(e.value) == "no running pod demo/api on this node (none of the 2 pod sandbox(es) here)"
    with pytest.raises(CriError) as e:
        pick_sandbox([], "demo", "web")
    assert str(e.value) == "no running pod demo/web on this node (no pod sandboxes here)"
    with pytest.raises(CriError):  # names match whole, case and all
        pick_sandbox([sandbox("x", namespace="Demo", name="Web")], "demo", "web")


# ---- Cri without a runtime

def lookup(path, namespace="demo", name="web"):
    import asyncio
    return asyncio.run(Cri(str(path), timeout=2).pod_netns(namespace, name))


def test_no_socket(tmp_path):
    with pytest.raises(CriError) as e:
        lookup(tmp_path / "containerd.sock")
    assert str(e.value) == f"cannot reach the container runtime at {tmp_path}/containerd.sock: No such file or directory"
    (tmp_path / "file").write_text("")
    with pytest.raises(CriError, match=r"^cannot reach the container runtime at .*/file: not a socket$"):
        lookup(tmp_path / "file")


def test_a_socket_nobody_listens_on(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "dead.sock"))
        with pytest.raises(CriError) as e:
            lookup(tmp_path / "dead.sock")
    assert str(e.value) == f"cannot reach the container runtime at {tmp_path}/dead.sock: Connection refused"


def test_a_socket_that_never_answers(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "mute.sock"))
        s.listen(8)  # accepted by the kernel, never served
        with pytest.raises(CriError) as e:
            lookup(tmp_path / "mute.sock")
    assert str(e.value) == f"cannot reach the container runtime at {tmp_path}/mute.sock: no answer to ListPodSandbox in 2 s"


def test_an_empty_pod_name_is_refused(tmp_path):
    with pytest.raises(CriError, match=r"^invalid pod demo/: k8s-ns takes NAMESPACE/POD$"):
        lookup(tmp_path / "x.sock", "demo", "")


def test_without_the_extra_it_says_how_to_install_it(tmp_path):
    """A Python where the CRI client cannot be imported (as without `[k8s]`): the daemon's
    modules load, and the lookup says what to install."""
    code = f"""
import asyncio, sys
sys.modules["cri_api"] = None  # import cri_api fails as when it is not installed
from wormholed.cri import Cri, CriError
try:
    asyncio.run(Cri({str(tmp_path / "x.sock")!r}).pod_netns("demo", "web"))
except CriError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(INSTALL_HINT + " (")
    assert INSTALL_HINT == "k8s-ns needs the CRI client: pip install 'ns-wormhole[k8s]'"


def test_importing_the_module_does_not_import_grpc():
    code = "import sys, wormholed.cri; print('grpc' in sys.modules, 'cri_api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
