"""A containerd of the tests' own, with its CRI plugin, for `k8s-ns` (wormholed/cri.py).

No kubelet or cluster runs here, but the container runtime can: `k8s-ns NAMESPACE/POD`
finds a pod's network namespace through the CRI API that a kubelet would use, and pods made
through that same API (RunPodSandbox, CreateContainer, StartContainer) are real pods to it.
So the tests start Debian's containerd 1.6 with everything in a temporary directory (root,
state, socket, config, logs), and:

* images built here from busybox-static (no registry: containerd pulls only a missing image)
  and loaded with `ctr -n k8s.io images import`: a sandbox ("pause") image whose process
  just sleeps, and an echo server on port 80 (`nc -ll -p 80 -e /bin/cat`);
* `restrict_oom_score_adj = true`: root here lacks CAP_SYS_RESOURCE, and the CRI plugin
  otherwise asks for an OOM score it may not set;
* a CNI configuration whose plugin (functional_tests/cni/wh-test-veth) gives the pod an
  `eth0` with an address, as containerd's CRI plugin requires, with a veth pair made wholly
  inside the pod's namespace: nothing on the host is touched;
* the pods' namespaces mounted under the state directory (`netns_mounts_under_state_dir`),
  runc's state there too, and a cgroup parent of its own, so nothing of it mixes with the
  Docker engine's containerd or outlives the tests.

`running()` yields a started `Containerd` and undoes all of it, whatever happened: the pods
it ran removed, containerd stopped, any shim and container it left killed, the mounts under
its directory detached, its cgroups and the directory removed. A missing containerd binary
fails (as a missing Docker engine does), it does not skip.

`python functional_tests/containerd.py DIR` records the PodSandboxStatus verbose info of a pod
and of a host-network pod into DIR (unit_tests/data holds what it wrote).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CNI_PLUGIN = HERE / "cni" / "wh-test-veth"
BUSYBOX = Path(os.environ.get("BUSYBOX", "/bin/busybox"))
PAUSE_IMAGE = "wormhole.test/pause:1"
ECHO_IMAGE = "wormhole.test/echo:1"
POD_ADDRESS = "10.88.0.2/24"
START_TIMEOUT = 30

# The pause process exits on SIGTERM (as PID 1 it would otherwise ignore it).
PAUSE_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"]
# busybox nc queues as many connections as it was given -l flags (see examples/images/build.sh).
ECHO_CMD = ["/bin/sh", "-c", "trap 'exit 0' TERM INT; /bin/nc -" + "l" * 32 + " -p 80 -e /bin/cat & wait"]


class ContainerdMissing(Exception):
    pass


def _config(base: Path) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[debug]
  level = "info"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.cni]
    bin_dir = "{base}/cni-bin"
    conf_dir = "{base}/cni-conf"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        Root = "{base}/state/runc"
"""


# --------------------------------------------------------------------------
# Images: an OCI layout archive made here from busybox-static, for `ctr images import`.

def _blob(blobs: dict[str, bytes], data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"digest": digest, "size": len(data)}


def _rootfs() -> bytes:
    if not BUSYBOX.is_file():
        raise ContainerdMissing(f"no {BUSYBOX} (install busybox-static: scripts/install-deps)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, data=b"", link=""):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.linkname = kind, mode, 0, link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        for d in ("bin", "etc", "root", "proc", "sys", "dev"):
            add(d)
        add("tmp", mode=0o1777)
        add("bin/busybox", tarfile.REGTYPE, data=BUSYBOX.read_bytes())
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                add(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    return buf.getvalue()


def image_archive(path: Path) -> None:
    """Write an OCI image layout tar with PAUSE_IMAGE and ECHO_IMAGE (one layer, two configs)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    blobs: dict[str, bytes] = {}
    layer = _rootfs()
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(blobs, layer)}
    manifests = []
    for name, cmd in ((PAUSE_IMAGE, PAUSE_CMD), (ECHO_IMAGE, ECHO_CMD)):
        config = {"architecture": arch, "os": "linux",
                  "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
                  "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
        config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json",
                       **_blob(blobs, json.dumps(config).encode())}
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": config_desc, "layers": [layer_desc]}
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          **_blob(blobs, json.dumps(manifest).encode()),
                          "annotations": {"io.containerd.image.name": name,
                                          "org.opencontainers.image.ref.name": name.rpartition(":")[2]}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    with tarfile.open(path, "w") as tar:
        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            put("blobs/sha256/" + digest.split(":")[1], data)


# --------------------------------------------------------------------------

@dataclass
class Pod:
    namespace: str
    name: str
    sandbox_id: str
    container_id: str


class Containerd:
    """A containerd started by `running()`; its CRI API through the v1 stubs (`runtime`)."""

    def __init__(self, base: Path):
        self.base = base
        self.socket = str(base / "containerd.sock")
        self.log = base / "containerd.log"
        self.cgroup = f"/wh-cri-test-{os.getpid()}-{base.name[-6:]}"
        self.proc: subprocess.Popen | None = None
        self.pods: list[Pod] = []
        self._channel = None
        self.runtime = None  # RuntimeServiceStub
        self.api = None  # cri_api.v1.api_pb2

    # ---- life

    def start(self) -> None:
        for tool in ("containerd", "ctr", "runc", "nsenter", "ip"):
            if shutil.which(tool) is None:
                raise ContainerdMissing(f"no {tool} on PATH (the CRI tests need Debian's containerd: "
                                        f"scripts/install-deps installs it)")
        from cri_api.v1 import api_pb2
        for d in ("cni-bin", "cni-conf", "logs", "opt"):
            (self.base / d).mkdir()
        for name in ("wh-test-veth", "loopback"):
            (self.base / "cni-bin" / name).symlink_to(CNI_PLUGIN)
        (self.base / "cni-conf" / "10-wh-test.conf").write_text(json.dumps(
            {"cniVersion": "0.4.0", "name": "wh-test", "type": "wh-test-veth", "address": POD_ADDRESS}))
        (self.base / "config.toml").write_text(_config(self.base))
        self.api = api_pb2
        self._launch()
        archive = self.base / "images.tar"
        image_archive(archive)
        self.ctr("images", "import", str(archive))

    def restart(self) -> None:
        """Stop containerd (unless crash() did) and start it again, as a node's runtime is
        restarted or upgraded: the pods (their shims) keep running, clients see the socket go
        and come back."""
        self._stop()
        self._launch()

    def crash(self) -> None:
        """Kill containerd (SIGKILL, as the OOM killer would): its socket file stays behind,
        refusing connections, until restart()."""
        self.proc.kill()
        self.proc.wait()

    def _launch(self) -> None:
        """Start containerd (its config written) and wait until its CRI is ready."""
        import grpc
        from cri_api.v1 import api_pb2_grpc
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(self.base / "config.toml")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                status = self.runtime.Status(self.api.StatusRequest(), timeout=2)
                ready = {c.type: c.status for c in status.status.conditions}
                if ready.get("RuntimeReady") and ready.get("NetworkReady"):
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd's CRI not ready in {START_TIMEOUT} s:\n{self.logs()}")
            time.sleep(0.1)

    def ctr(self, *args: str) -> str:
        done = subprocess.run(["ctr", "--address", self.socket, "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def logs(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    # ---- pods

    def run_pod(self, namespace: str, name: str, *, host_network: bool = False, attempt: int = 0) -> Pod:
        """A pod with one container, the echo server on port 80 in the pod's network namespace;
        with host_network, a pod in the host's network and no container (nothing listens on the host)."""
        api = self.api
        mode = api.NODE if host_network else api.POD
        uid = hashlib.sha256(f"{namespace}/{name}/{time.time_ns()}".encode()).hexdigest()[:32]
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=attempt),
            hostname="" if host_network else name, log_directory=str(self.base / "logs" / uid),
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace},
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup,
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(network=mode, pid=api.POD, ipc=api.POD))))
        sandbox_id = self.runtime.RunPodSandbox(api.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        pod = Pod(namespace, name, sandbox_id, "")
        self.pods.append(pod)
        if host_network:
            return pod
        container = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="server"), image=api.ImageSpec(image=ECHO_IMAGE),
            log_path="server.log", linux=api.LinuxContainerConfig())
        pod.container_id = self.runtime.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=container, sandbox_config=config), timeout=60).container_id
        self.runtime.StartContainer(api.StartContainerRequest(container_id=pod.container_id), timeout=60)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        api = self.api
        self.runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=60)
        self.runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=60)
        with contextlib.suppress(ValueError):
            self.pods.remove(pod)

    def verbose_info(self, pod: Pod) -> dict:
        """PodSandboxStatus(verbose=true)'s info["info"], decoded."""
        status = self.runtime.PodSandboxStatus(self.api.PodSandboxStatusRequest(
            pod_sandbox_id=pod.sandbox_id, verbose=True), timeout=10)
        return json.loads(status.info["info"])

    # ---- undo

    def _stop(self) -> None:
        """The client's channel closed and containerd stopped (its shims and pods stay)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> list[str]:
        errors = []
        for pod in list(self.pods):
            try:
                self.remove_pod(pod)
            except Exception as e:  # the rest is undone all the same
                errors.append(f"remove pod {pod.namespace}/{pod.name}: {e}")
        self._stop()
        _kill_shims(self.socket)
        _unmount_under(self.base)
        _remove_cgroups(self.cgroup)
        return errors


def _processes() -> dict[int, int]:
    """pid -> parent pid of every process."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                found[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _kill_shims(socket_path: str) -> None:
    """The runc shims this containerd started (they outlive it) and their containers."""
    shims = []
    for pid in _processes():
        with contextlib.suppress(OSError):
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"containerd-shim" in args[0] and socket_path.encode() in args:
                shims.append(pid)
    if not shims:
        return
    parents = _processes()
    doomed, todo = set(shims), list(shims)
    while todo:
        parent = todo.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in doomed:
                doomed.add(pid)
                todo.append(pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in doomed):
        time.sleep(0.05)


def _unmount_under(base: Path) -> None:
    prefix = str(base) + "/"
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _remove_cgroups(parent: str) -> None:
    roots = [Path("/sys/fs/cgroup")] + [p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir()]
    for root in roots:
        top = root / parent.lstrip("/")
        if top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


@contextlib.contextmanager
def running():
    """A started Containerd; everything it made is undone on the way out."""
    base = Path(tempfile.mkdtemp(prefix="wh-containerd-"))
    ctd = Containerd(base)
    try:
        ctd.start()
        yield ctd
    except BaseException:
        if ctd.proc is not None:
            print(f"--- containerd log ---\n{ctd.logs()}")
        raise
    finally:
        try:
            errors = ctd.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if errors:
        raise RuntimeError("; ".join(errors))


def record(out: Path) -> None:
    """Write the verbose info of a pod and of a host-network pod, as unit tests read them."""
    with running() as ctd:
        version = ctd.runtime.Version(ctd.api.VersionRequest(), timeout=5)
        tag = "containerd" + "".join(version.runtime_version.split(".")[:2]).split("~")[0]
        for kind, host in (("pod", False), ("hostnet", True)):
            pod = ctd.run_pod("demo", "web" if not host else "hostweb", host_network=host)
            info = ctd.verbose_info(pod)
            (out / f"cri_{tag}_{kind}.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
            ctd.remove_pod(pod)


if __name__ == "__main__":
    import sys
    record(Path(sys.argv[1]))
