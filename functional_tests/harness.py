"""Test hosts for functional tests: a network namespace with its own
/etc/wormhole (bound by `ip netns exec` from /etc/netns/NAME), state dir and
wormholed. Everything made here is undone by `close()`, which runs even when
a test fails.

A Host also has its own mount namespace, held by an anchor process (`sleep infinity`)
for the host's whole life, so that daemon restarts see the same mounts: /etc/wormhole is
the host's /etc/netns/NAME/wormhole and /run/wireguard a private tmpfs (wireguard-go's
UAPI sockets). The daemon, the CLI and helpers run there through `nsenter`. close()
kills every process left in the host's network or mount namespace (wireguard-go
detaches and outlives wormholed), then the anchor, then removes the namespace."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns

import pcap

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORMHOLE, WORMHOLED = str(BIN / "wormhole"), str(BIN / "wormholed")
ECHO = str(Path(__file__).parent / "echo_server.py")
ETC = Path("/etc/wormhole")
# How many times longer to wait for daemons: the kernel lab (a VM without KVM) sets it.
SLOW = float(os.environ.get("WORMHOLE_TEST_SLOW", "1"))
RUN_WIREGUARD = Path("/run/wireguard")


def _ns_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _ping() -> list[str]:
    return ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def pids_in(ns_path: str, kind: str = "net") -> list[int]:
    """Live processes whose `kind` namespace (net, mnt) is the one at ns_path."""
    want = _ns_inode(ns_path)
    if want is None:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and _ns_inode(f"/proc/{entry}/ns/{kind}") == want:
            if _alive(int(entry)):
                found.append(int(entry))
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def become_subreaper() -> None:
    """Orphans of our descendants (wireguard-go detaches from wormholed) become our children
    rather than pid 1's, which on some machines never reaps them; reap_orphans() reaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans(names: tuple[str, ...] = ("wireguard-go",)) -> None:
    """Reap our zombie children with these names (orphans we adopted as subreaper; our own
    Popen children are left to their Popen)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if rest[0] == "Z" and int(rest[1]) == me and name in names:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def kill_all(pids_of, timeout: float = 10) -> list[int]:
    """SIGKILL what `pids_of()` returns until it returns nothing (new processes may appear
    while killing); returns the pids that were killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (pids := pids_of()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.05)
    reap_orphans()
    return killed


class Namespace:
    """A named network namespace with lo up; removed by close()."""

    def __init__(self, name: str):
        self.name = name
        self.procs: list[subprocess.Popen] = []
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        # IPv6 addresses usable at once (no duplicate address detection on test links)
        Namespace.exec(self, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")

    def exec(self, *argv, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True, **kw)

    def popen(self, *argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kw)

    @contextlib.contextmanager
    def entered(self):
        """Run the block in this namespace (this thread only), then come back."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.name}") as there:
            os.setns(there.fileno(), os.CLONE_NEWNET)
            try:
                yield
            finally:
                os.setns(home.fileno(), os.CLONE_NEWNET)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def pids(self) -> list[int]:
        """Live processes in this network namespace."""
        return pids_in(self.path)

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 10, udp: bool = False) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with self.entered():
            s = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((host, port))
        return s

    def echo_server(self, port: int, host: str = "127.0.0.1", udp: bool = False) -> subprocess.Popen:
        argv = [sys.executable, ECHO, host, str(port)] + (["--udp"] if udp else [])
        proc = self.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        assert proc.stdout.readline().strip() == b"ready"
        return proc

    def ping(self, ip: str, count: int = 3, wait: float = 2) -> subprocess.CompletedProcess:
        """`ping -c COUNT -W WAIT IP` here (busybox's when iputils' is not installed)."""
        return self.exec(*_ping(), "-c", str(count), "-W", str(int(wait)), ip, timeout=count * wait + 10)

    def reaches(self, ip: str, within: float = 15 * SLOW) -> subprocess.CompletedProcess:
        """`ping -c 1 -w WITHIN IP`: a ping a second until the first reply (it returns then),
        for WITHIN seconds: room for a lost first WireGuard handshake, retried after 5 s."""
        return self.exec(*_ping(), "-c", "1", "-w", str(int(within)), ip, timeout=within + 10)

    def listening(self, port: int, host: str = "127.0.0.1") -> bool:
        try:
            self.connect(port, host, timeout=1).close()
            return True
        except OSError:
            return False

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        kill_all(self.pids)
        with contextlib.suppress(OSError, FileNotFoundError):
            netns.remove(self.name)


class Host(Namespace):
    """A test host: a namespace running its own wormholed with its own key."""

    def __init__(self, name: str, key: str | None = None):
        self.name = name
        self.anchor: subprocess.Popen | None = None
        self.anchor_pid: int | None = None
        self.daemon: subprocess.Popen | None = None
        self.etc = Path("/etc/netns") / name / "wormhole"
        self.dir = Path(tempfile.mkdtemp(prefix=f"wh-{name}-"))
        self.sock = f"unix://{self.dir}/ctl.sock"
        self.state = self.dir / "state"
        self.log = self.dir / "wormholed.log"
        self.key = key or "test-key-" + name
        self.procs = []
        try:
            super().__init__(name)
            self.etc.mkdir(parents=True)
            self.write_key(self.key)
            self._start_anchor()
        except BaseException:
            self.close()
            raise

    def _start_anchor(self) -> None:
        """A process holding this host's mount namespace: a copy of what `ip netns exec`
        sets up (/etc/netns/NAME/* bound over /etc, /sys of the netns) plus a private
        tmpfs on /run/wireguard; mounts of the machine still propagate into it."""
        script = f"mount -t tmpfs -o mode=0755 wh-{self.name} {RUN_WIREGUARD} && echo ready $$ && exec sleep infinity"
        self.anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        line = self.anchor.stdout.readline().decode().split()
        if line[:1] != ["ready"]:
            self.anchor.kill()
            err = self.anchor.communicate()[1].decode(errors="replace")
            raise AssertionError(f"mount namespace for {self.name} not made: {err.strip()}")
        self.anchor_pid = int(line[1])
        assert self.anchor_pid == self.anchor.pid, "the anchor is the process we started"

    def _enter(self, argv, kw) -> list[str]:
        wd = str(kw.pop("cwd", None) or os.getcwd())
        return ["nsenter", "-t", str(self.anchor_pid), "-m", "-n", f"--wd={wd}", "--", *map(str, argv)]

    def exec(self, *argv, **kw) -> subprocess.CompletedProcess:
        """Run a command in this host's network and mount namespaces."""
        return subprocess.run(self._enter(argv, kw), capture_output=True, text=True, **kw)

    def popen(self, *argv, **kw) -> subprocess.Popen:
        return subprocess.Popen(self._enter(argv, kw), **kw)

    def mnt_pids(self) -> list[int]:
        """Live processes in this host's mount namespace (the anchor included)."""
        return pids_in(f"/proc/{self.anchor_pid}/ns/mnt", "mnt") if self.anchor_pid else []

    def wg(self, *args: str) -> str:
        """`wg ARGS` (wireguard-tools) here, e.g. wg("show", "all", "dump"); its stdout."""
        r = self.exec("wg", *args, timeout=30)
        assert r.returncode == 0, f"wg {' '.join(args)} on {self.name} -> {r.returncode}: {r.stderr}"
        return r.stdout

    def wg_dump(self) -> dict[str, dict]:
        """`wg show all dump` as {iface: {"private_key", "public_key", "listen_port", "fwmark",
        "peers": {public_key: {"preshared_key", "endpoint", "allowed_ips",
        "latest_handshake", "rx", "tx", "keepalive"}}}}."""
        out: dict[str, dict] = {}
        for line in self.wg("show", "all", "dump").splitlines():
            f = line.split("\t")
            if len(f) == 5:
                out[f[0]] = {"private_key": f[1], "public_key": f[2], "listen_port": int(f[3]),
                             "fwmark": f[4], "peers": {}}
            elif len(f) == 9:
                out[f[0]]["peers"][f[1]] = {
                    "preshared_key": f[2], "endpoint": f[3], "allowed_ips": f[4],
                    "latest_handshake": int(f[5]), "rx": int(f[6]), "tx": int(f[7]), "keepalive": f[8]}
        return out

    def interfaces(self, prefix: str = "") -> list[str]:
        with NetNS(self.name) as ns:
            names = [link.get_attr("IFLA_IFNAME") for link in ns.get_links()]
        return sorted(n for n in names if n.startswith(prefix))

    def wireguard_go(self) -> list[int]:
        """wireguard-go processes in this host's network namespace."""
        reap_orphans()
        return [pid for pid in self.pids()
                if comm(pid).startswith("wireguard-go") or any("wireguard-go" in a for a in cmdline(pid)[:1])]

    def tunnel_records(self) -> list[Path]:
        d = self.state / "tunnels"
        return sorted(p for p in d.iterdir()) if d.is_dir() else []

    def leftovers(self) -> list[str]:
        """What a tunnel left on this host: wh-* interfaces, wireguard-go processes, files
        under STATE/tunnels/; [] when there is nothing."""
        found = [f"interface {n}" for n in self.interfaces("wh-")]
        found += [f"wireguard-go pid {pid}: {' '.join(cmdline(pid))}" for pid in self.wireguard_go()]
        found += [f"record {p.relative_to(self.dir)}" for p in self.tunnel_records()]
        return found

    def write_key(self, key: str, mode: int = 0o600) -> None:
        path = self.etc / "key.secret"
        path.write_text(key + "\n")
        os.chmod(path, mode)

    def start(self, *args: str, wait: bool = True, env: dict | None = None) -> subprocess.Popen:
        """Run wormholed; with `wait`, until it reports READY=1 (after restoring its records)."""
        notify = self.launch(*args, env=env, notify=wait)
        if wait:
            self.ready(notify)
        return self.daemon

    def launch(self, *args: str, env: dict | None = None, notify: bool = True) -> socket.socket | None:
        """Run wormholed and return at once; with `notify`, the socket its READY=1 comes to,
        for ready() (start() is launch() then ready(); start_together() starts several)."""
        argv = [WORMHOLED, "-H", self.sock, "-H", "tcp://:9999", "--state-dir", str(self.state), *args]
        env = dict(env if env is not None else os.environ)
        sock = None
        if notify and "NOTIFY_SOCKET" not in env:
            path = self.dir / "notify.sock"
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(path))
            env["NOTIFY_SOCKET"] = str(path)
        try:
            self.daemon = self.popen(*argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env=env)
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return sock

    def ready(self, notify: socket.socket | None) -> None:
        """Wait until the daemon launch() ran is ready; closes `notify`."""
        try:
            self.wait_ready(notify)
        finally:
            if notify is not None:
                notify.close()

    def wait_ready(self, notify: socket.socket | None = None, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout * SLOW
        if notify is not None:
            notify.settimeout(0.1)
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise AssertionError(f"wormholed on {self.name} exited {self.daemon.returncode}:\n{self.logs()}")
            if notify is not None:
                try:
                    if notify.recv(100) == b"READY=1":
                        return
                except TimeoutError:
                    pass
            elif self.wormhole("ping").returncode == 0:
                return
            else:
                time.sleep(0.1)
        raise AssertionError(f"wormholed on {self.name} not ready after {timeout} s:\n{self.logs()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 15 * SLOW) -> int | None:
        if self.daemon is None:
            return None
        if self.daemon.poll() is None:
            self.daemon.send_signal(sig)
        try:
            return self.daemon.wait(timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            return self.daemon.wait()

    def wormhole(self, *args: str, host: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
        return self.exec(WORMHOLE, "-H", host or self.sock, *args, timeout=timeout)

    def first_ping(self, host: str) -> subprocess.CompletedProcess:
        """`wormhole ping` at a socket-activated daemon's address, again while it fails: the
        first one starts the daemon, which under load can take longer than the CLI's 5 s
        connect timeout. Stops when it answers, the activator exits, or after 60 s."""
        deadline = time.monotonic() + 60 * SLOW
        while (r := self.wormhole("ping", host=host)).returncode and time.monotonic() < deadline:
            if self.daemon is not None and self.daemon.poll() is not None:
                break
            time.sleep(0.2)
        return r

    def ok(self, *args: str) -> str:
        r = self.wormhole(*args)
        assert r.returncode == 0, f"wormhole {' '.join(args)} -> {r.returncode}: {r.stderr}\n{self.logs()}"
        return r.stdout

    def create(self, *words: str) -> tuple[str, str]:
        ident, url = self.ok("create", *words).split()
        return ident, url

    def list(self) -> list[dict]:
        import json
        return json.loads(self.ok("list", "--json"))

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def close(self) -> None:
        """Stop the daemon, kill what is left in the netns and the mount namespace (its
        wireguard-go), then the anchor; remove the netns and the dirs. Safe on a partly
        made host."""
        try:
            self.stop()
        finally:
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            self.procs = []
            keep = {self.anchor_pid}
            kill_all(lambda: [p for p in set(self.pids()) | set(self.mnt_pids()) if p not in keep])
            if self.anchor is not None:
                with contextlib.suppress(ProcessLookupError):
                    self.anchor.kill()
                self.anchor.wait()
                self.anchor.stdout.close()
                self.anchor.stderr.close()
            if Path(self.path).exists():
                super().close()
            shutil.rmtree(self.etc.parent, ignore_errors=True)
            shutil.rmtree(self.dir, ignore_errors=True)


def veth(a: Namespace, a_ips: str, b: Namespace, b_ips: str) -> None:
    """A veth pair joining two namespaces, with addresses like "192.0.2.1/24,2001:db8::1/64";
    removed with the namespaces."""
    ifa, ifb = f"{a.name}-{b.name}"[-15:], f"{b.name}-{a.name}"[-15:]
    with IPRoute() as ip:
        ip.link("add", ifname=ifa, kind="veth", peer=ifb)
        for ifname, ns in ((ifa, a), (ifb, b)):
            ip.link("set", index=ip.link_lookup(ifname=ifname)[0], net_ns_fd=ns.name)
    for ifname, ns, addrs in ((ifa, a, a_ips), (ifb, b, b_ips)):
        with NetNS(ns.name) as n:
            idx = n.link_lookup(ifname=ifname)[0]
            for addr in addrs.split(","):
                ip, prefix = addr.split("/")
                n.addr("add", index=idx, address=ip, prefixlen=int(prefix))
            n.link("set", index=idx, state="up")


class Capture:
    """What capture() saw: the pcap file's path and, after the block, its packets."""

    def __init__(self, path: Path):
        self.path = path
        self.packets: list[pcap.Packet] = []

    def ip(self) -> list[pcap.Packet]:
        return [p for p in self.packets if p.is_ip]


@contextlib.contextmanager
def capture(ns: Namespace, iface: str, path: str | Path | None = None, timeout: float = 10):
    """`tcpdump -i IFACE -w FILE -U` in ns for the duration of the block:

        with capture(h1, "eth0") as cap:
            ...traffic...
        for p in cap.packets: ...      # pcap.Packet(proto, src, sport, dst, dport, payload, raw)

    Capturing has started when the block begins; the file is read when it ends. Without
    `path` the file is a temporary one, removed after reading."""
    tmp = None
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="wh-pcap-"))
        path = tmp / f"{iface}.pcap"
    path = Path(path)
    cap = Capture(path)
    # --immediate-mode: packets reach the file as they come, not when a ring block fills
    proc = ns.popen("tcpdump", "-i", iface, "-w", str(path), "-U", "--immediate-mode", "-n", "-s", "0", "-Z", "root",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = False
    try:
        # tcpdump says "listening on IFACE" once the capture is active
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            err = []
            while line := proc.stderr.readline():
                err.append(line.decode(errors="replace"))
                if b"listening on" in line:
                    break
            else:
                raise AssertionError(f"tcpdump -i {iface} in {ns.name} did not start: {''.join(err)}")
        finally:
            timer.cancel()
        yield cap
        time.sleep(0.2)  # let the last packets reach the file
        done = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        try:
            if done:  # (after a failure in the block, that failure is what counts)
                cap.packets = pcap.read(path)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Poll predicate every 50 ms until it holds; fail naming `what` after timeout (times SLOW) seconds."""
    deadline = time.monotonic() + timeout * SLOW
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout * SLOW:.0f} s: {what}"
        time.sleep(0.05)


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def s_client(ns: Namespace, key: str, lines: list[str], replies: int, port: int = 9999) -> list[str]:
    """Talk to a daemon with `openssl s_client` (TLS 1.3, external PSK): send lines, read replies."""
    proc = ns.popen("openssl", "s_client", "-tls1_3", "-quiet", "-psk", key.encode().hex(),
                    "-psk_identity", "openssl-test", "-connect", f"127.0.0.1:{port}",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    timer = threading.Timer(20, proc.kill)  # bound the test if the daemon goes silent
    timer.start()
    try:
        proc.stdin.write("".join(line + "\n" for line in lines).encode())
        proc.stdin.flush()
        return [proc.stdout.readline().decode() for _ in range(replies)]
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()


def start_together(*hosts_args: tuple[Host, tuple[str, ...]]) -> None:
    """Start several hosts' daemons at once and wait for each: in the kernel lab, whose CPUs
    are emulated, a daemon takes seconds to start, and two start in little more than one."""
    launched: list[tuple[Host, socket.socket | None]] = []
    try:
        for h, args in hosts_args:
            launched.append((h, h.launch(*args)))
        while launched:
            h, notify = launched.pop(0)
            h.ready(notify)
    finally:
        for _, notify in launched:  # after a failure: the rest are not waited for
            if notify is not None:
                notify.close()
