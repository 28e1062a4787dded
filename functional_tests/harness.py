"""Test hosts for functional tests (DESIGN §9): a network namespace with its own
/etc/wormhole (bound by `ip netns exec` from /etc/netns/NAME), state dir and
wormholed. Everything made here is undone by `close()`, which runs even when
a test fails."""

from __future__ import annotations

import contextlib
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORMHOLE, WORMHOLED = str(BIN / "wormhole"), str(BIN / "wormholed")
ECHO = str(Path(__file__).parent / "echo_server.py")
ETC = Path("/etc/wormhole")


class Namespace:
    """A named network namespace with lo up; removed by close()."""

    def __init__(self, name: str):
        self.name = name
        self.procs: list[subprocess.Popen] = []
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        # IPv6 addresses usable at once (no duplicate address detection on test links)
        self.exec("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0")

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
        with contextlib.suppress(OSError, FileNotFoundError):
            netns.remove(self.name)


class Host(Namespace):
    """A test host: a namespace running its own wormholed with its own key."""

    def __init__(self, name: str, key: str | None = None):
        super().__init__(name)
        self.dir = Path(tempfile.mkdtemp(prefix=f"wh-{name}-"))
        self.etc = Path("/etc/netns") / name / "wormhole"
        self.etc.mkdir(parents=True)
        self.key = key or "test-key-" + name
        self.write_key(self.key)
        self.sock = f"unix://{self.dir}/ctl.sock"
        self.state = self.dir / "state"
        self.log = self.dir / "wormholed.log"
        self.daemon: subprocess.Popen | None = None

    def write_key(self, key: str, mode: int = 0o600) -> None:
        path = self.etc / "key.secret"
        path.write_text(key + "\n")
        os.chmod(path, mode)

    def start(self, *args: str, wait: bool = True, env: dict | None = None) -> subprocess.Popen:
        """Run wormholed; with `wait`, until it reports READY=1 (after restoring its records)."""
        argv = [WORMHOLED, "-H", self.sock, "-H", "tcp://:9999", "--state-dir", str(self.state), *args]
        env = dict(env if env is not None else os.environ)
        notify = None
        if wait and "NOTIFY_SOCKET" not in env:
            path = self.dir / "notify.sock"
            path.unlink(missing_ok=True)
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(str(path))
            env["NOTIFY_SOCKET"] = str(path)
        self.daemon = self.popen(*argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), env=env)
        if wait:
            try:
                self.wait_ready(notify)
            finally:
                if notify is not None:
                    notify.close()
        return self.daemon

    def wait_ready(self, notify: socket.socket | None = None, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
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

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
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
        self.stop()
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
