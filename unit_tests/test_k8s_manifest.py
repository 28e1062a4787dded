"""examples/k8s: the DaemonSet manifest against the Kubernetes API schemas (kubernetes-validate,
strict: an unknown field is an error) and the properties README's Kubernetes section promises;
wormhole-k8s, its entrypoint and probes, with a stand-in for the daemon (no root, no cluster)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "examples" / "k8s"
SCRIPT = K8S / "wormhole-k8s"
# The oldest Kubernetes still supported when this was written, and the newest the package knows.
VERSIONS = ["1.30", kubernetes_validate.latest_version()]
CAPABILITIES = {"SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "NET_BIND_SERVICE"}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        with path.open() as f:
            docs += [(path.name, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def the(kind: str) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


@pytest.fixture(scope="module")
def pod() -> dict:
    return the("DaemonSet")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def mount(container: dict, pod: dict, path: str) -> tuple[dict, dict]:
    """(the volumeMount at path, its volume)."""
    [m] = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    [v] = [v for v in pod["volumes"] if v["name"] == m["name"]]
    return m, v


def test_there_are_documents():
    kinds = sorted(d["kind"] for _, d in documents())
    assert kinds == ["DaemonSet", "Namespace"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_is_valid_for_kubernetes(version):
    for name, doc in documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_validation_is_strict():
    doc = the("DaemonSet")
    bad = {**doc, "spec": {**doc["spec"], "maxSurge": 1}}  # a field of rollingUpdate, misplaced
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_host_network_and_pids(pod, container):
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True
    # with hostNetwork a container port is a hostPort, and a surge pod would not be scheduled
    assert "ports" not in container


def test_capabilities_not_privileged(pod, container):
    sc = container["securityContext"]
    assert sc.get("privileged", False) is False
    assert "privileged" not in pod.get("securityContext", {})
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPABILITIES
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # the API refuses allowPrivilegeEscalation: false beside SYS_ADMIN
    assert "allowPrivilegeEscalation" not in sc


def test_netns_mount_sees_namespaces_made_later(pod, container):
    m, v = mount(container, pod, "/run/netns")
    assert m["mountPropagation"] == "HostToContainer"
    assert v["hostPath"]["path"] == "/run/netns"


def test_cri_socket_mount_is_the_one_the_daemon_asks(pod, container):
    args = container["args"]
    path = args[args.index("--cri-socket") + 1]
    assert path == "/run/containerd/containerd.sock"
    _, v = mount(container, pod, path)
    assert v["hostPath"] == {"path": path, "type": "Socket"}


def test_state_dir_and_wireguard_are_the_nodes(pod, container):
    [state_dir] = [e["value"] for e in container["env"] if e["name"] == "WORMHOLE_STATE_DIR"]
    _, v = mount(container, pod, state_dir)
    assert v["hostPath"]["path"] == "/var/lib/wormhole"
    _, v = mount(container, pod, "/run/wireguard")
    assert v["hostPath"]["path"] == "/run/wireguard"
    _, v = mount(container, pod, "/tmp")  # the one-file build unpacks there; the root is read-only
    assert "emptyDir" in v
    assert not any(a == "--state-dir" or a.startswith("--state-dir=") for a in container["args"])


def test_key_from_a_secret_mode_0600(pod, container):
    m, v = mount(container, pod, "/etc/wormhole")
    assert m["readOnly"] is True
    assert v["secret"]["defaultMode"] == 0o600
    assert v["secret"]["items"] == [{"key": "key.secret", "path": "key.secret"}]


def test_rolling_update_surges(pod, container):
    spec = the("DaemonSet")["spec"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["command"] == ["wormhole-k8s", "run"]
    assert container["startupProbe"]["exec"]["command"] == ["wormhole-k8s", "ready"]
    assert container["readinessProbe"]["exec"]["command"] == ["wormhole-k8s", "ready"]
    assert container["livenessProbe"]["exec"]["command"] == ["wormhole-k8s", "alive"]


def test_namespace_admits_the_pod():
    ns = the("Namespace")
    assert the("DaemonSet")["metadata"]["namespace"] == ns["metadata"]["name"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_image_holds_the_entrypoint():
    dockerfile = (K8S / "Dockerfile").read_text()
    assert "dist/wormhole" in dockerfile and "examples/k8s/wormhole-k8s" in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/wormhole-k8s"]' in dockerfile
    assert os.access(SCRIPT, os.X_OK)


# wormhole-k8s, with a stand-in for the one-file wormhole

STUB = r"""#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case $1 in
    ping) exit "${FAKE_PING:-0}" ;;
    daemon) ;;
    *) exit 2 ;;
esac
case ${FAKE_DAEMON:-serve} in
    serve)  # until SIGTERM
        trap 'echo TERM >> "$FAKE_LOG"; exit 0' TERM
        echo $$ > "$WORMHOLE_STATE_DIR/daemon.pid"
        while :; do sleep 0.05; done ;;
    handover)  # exits 0 unasked; a successor takes the state dir's lock
        (exec 9<"$WORMHOLE_STATE_DIR"; flock 9 && exec sleep 60) &
        echo $! > "$FAKE_SUCCESSOR"
        exit 0 ;;
    crash) exit 3 ;;
esac
"""

needs_flock = pytest.mark.skipif(shutil.which("flock") is None, reason="no flock (util-linux)")


class Pod:
    """One pod's wormhole-k8s: its emptyDir, the node's state dir, the stand-in's log."""

    def __init__(self, tmp: Path, name: str = "pod", **fake: str):
        self.tmp = tmp
        stub = tmp / "wormhole"
        if not stub.exists():
            stub.write_text(STUB)
            stub.chmod(0o755)
        (tmp / "state").mkdir(exist_ok=True)
        self.dir = tmp / name
        self.dir.mkdir()
        self.log = tmp / f"{name}.log"
        self.log.touch()
        self.env = {**os.environ, "WORMHOLE": str(stub), "WORMHOLE_STATE_DIR": str(tmp / "state"),
                    "WORMHOLE_POD_DIR": str(self.dir), "FAKE_LOG": str(self.log),
                    "FAKE_SUCCESSOR": str(tmp / "successor.pid"), **fake}
        self.proc = None

    def run(self, *flags: str) -> subprocess.Popen:
        self.proc = subprocess.Popen([str(SCRIPT), "run", *flags], env=self.env, stderr=subprocess.PIPE,
                                     text=True)
        return self.proc

    def probe(self, which: str, **env: str) -> int:
        return subprocess.run([str(SCRIPT), which], env={**self.env, **env}, timeout=10).returncode

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def until(self, what, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out"
            assert self.proc is None or self.proc.poll() is None, self.proc.stderr.read()
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


@pytest.fixture
def tmp(tmp_path):
    yield tmp_path
    pid = tmp_path / "successor.pid"
    if pid.exists():
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def holder(tmp):
    """Another daemon holding the state dir (the old pod's)."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
    os.close(fd)


@needs_flock
def test_run_starts_the_daemon_and_passes_sigterm_on(tmp):
    pod = Pod(tmp)
    pod.run("-H", ":9999", "--cri-socket", "/run/c.sock")
    pod.until(lambda: (tmp / "state" / "daemon.pid").exists())
    assert pod.calls() == [f"daemon --state-dir {tmp / 'state'} -H :9999 --cri-socket /run/c.sock"]
    assert pod.stop() == 0
    assert pod.calls()[-1] == "TERM"
    assert not (pod.dir / "wormhole-handed-over").exists()


@needs_flock
def test_run_takes_over_from_the_daemon_holding_the_state_dir(tmp, holder):
    pod = Pod(tmp)
    pod.run("-H", ":9999")
    pod.until(lambda: pod.calls())
    assert pod.calls() == [f"daemon --state-dir {tmp / 'state'} --takeover -H :9999"]
    assert pod.stop() == 0


@needs_flock
def test_handed_over_waits_for_deletion_and_never_takes_back(tmp):
    pod = Pod(tmp, FAKE_DAEMON="handover")
    pod.run()
    pod.until(lambda: (pod.dir / "wormhole-handed-over").exists())
    time.sleep(0.3)
    assert pod.proc.poll() is None  # the container keeps running: no restart, no new takeover
    assert pod.probe("alive") == 0
    t0 = time.monotonic()
    assert pod.stop() == 0
    assert time.monotonic() - t0 < 2
    assert pod.calls() == [f"daemon --state-dir {tmp / 'state'}"]
    # the same pod's container restarted (its emptyDir kept): it waits, and starts nothing
    pod.run()
    time.sleep(0.5)
    assert pod.proc.poll() is None
    assert pod.calls() == [f"daemon --state-dir {tmp / 'state'}"]
    assert pod.stop() == 0


@needs_flock
def test_a_daemon_that_fails_fails_the_container(tmp):
    pod = Pod(tmp, FAKE_DAEMON="crash")
    pod.run()
    assert pod.proc.wait(timeout=10) == 3
    assert not (pod.dir / "wormhole-handed-over").exists()


def test_state_dir_comes_from_the_environment(tmp):
    pod = Pod(tmp)
    pod.run("--state-dir", "/elsewhere")
    assert pod.proc.wait(timeout=10) == 2
    assert pod.calls() == []


def test_ready_is_this_containers_daemon_answering(tmp):
    pod = Pod(tmp)
    pidfile = tmp / "state" / "daemon.pid"
    assert pod.probe("ready") != 0  # no daemon
    same = subprocess.Popen(["sleep", "60"])  # in this test's cgroup, as the probe is
    try:
        pidfile.write_text(f"{same.pid}\n")
        assert pod.probe("ready") == 0
        assert pod.calls() == ["ping"]
        assert pod.probe("ready", FAKE_PING="1") != 0
        assert pod.probe("alive", FAKE_PING="1") != 0
    finally:
        same.kill()
        same.wait()
    if Path("/proc/1/cgroup").read_text() != Path("/proc/self/cgroup").read_text():
        pidfile.write_text("1\n")  # a daemon in another container (cgroup)
        assert pod.probe("ready") != 0
    (pod.dir / "wormhole-handed-over").touch()
    assert pod.probe("alive") == 0
