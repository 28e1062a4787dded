"""dist/wormhole, the one-file build (`make dist`), works on its own: copied to a directory
outside the checkout and run with an environment that names neither the venv nor the
checkout, it is the CLI and the daemon (as a `wormholed` symlink and as `wormhole daemon`),
and bytes pass through a wormhole it made; under systemd-socket-activate, as the unit in
systemd/ would run it, the daemon (the bootloader's child) gets the socket and the watchdog.

The daemon is driven for real (control channel, native engine, a relayed connection, stop)
because a module PyInstaller's analysis missed shows only when it is imported: pyroute2 and
uvloop load some of theirs dynamically. The file is built when it is missing or older than the
sources (a build takes about 40 s here), so a session reuses an up-to-date one. Each daemon has
its own state dir, key and control port in a temporary directory, and TMPDIR there too, so that
the bootloader's unpacked copy (_MEI*) can be seen and must be gone after the daemon stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness import ECHO, ROOT, SLOW

DIST = ROOT / "dist" / "wormhole"
SOURCES = ("wormhole/**/*.py", "wormholed/**/*.py", "wormholed/_engine*.so", "scripts/build-dist",
           "scripts/pyinstaller-hooks/*.py", "pyproject.toml", "setup.py", ".venv/.installed-stamp")
MAX_SIZE = 30 << 20  # 17 MB today; an unstripped build or one with pytest inside is 40 MB

pytestmark = pytest.mark.timeout(900)  # a build on a busy 2-core machine, then the test


def _stale() -> str | None:
    """Why dist/wormhole must be built, or None when it is newer than every source."""
    if not DIST.exists():
        return "missing"
    built = DIST.stat().st_mtime
    for pattern in SOURCES:
        for path in ROOT.glob(pattern):
            if path.stat().st_mtime > built:
                return f"older than {path.relative_to(ROOT)}"
    return None


@pytest.fixture(scope="session")
def onefile() -> Path:
    if _stale():
        r = subprocess.run(["make", "-s", "dist"], cwd=ROOT, capture_output=True, text=True, timeout=850)
        assert r.returncode == 0, f"make dist -> {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert DIST.exists() and os.access(DIST, os.X_OK)
    return DIST


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Dir:
    """A fresh directory outside the checkout holding a copy of the file (and the wormholed
    symlink), the key, the state dir, TMPDIR, and what runs from there; close() ends it all."""

    def __init__(self, onefile: Path):
        self.path = Path(tempfile.mkdtemp(prefix="wh-dist-"))
        assert ROOT not in self.path.parents
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []  # the daemon's Python process, the bootloader's child
        shutil.copy2(onefile, self.path / "wormhole")
        (self.path / "wormholed").symlink_to("wormhole")
        self.tmp = self.path / "tmp"
        self.tmp.mkdir()
        self.key = self.path / "key.secret"
        self.log = self.path / "wormholed.log"
        self.port = _free_port()
        # Nothing that leads back to the venv, the checkout or a daemon elsewhere.
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("PYTHON", "VIRTUAL_ENV", "WORMHOLE_", "NOTIFY_SOCKET", "LISTEN_"))}
        self.env["PATH"] = os.pathsep.join(p for p in self.env.get("PATH", "").split(os.pathsep)
                                           if p and not p.startswith(str(ROOT)))
        self.env["TMPDIR"] = str(self.tmp)

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str) -> str:
        r = self.run("./wormhole", "-H", f"127.0.0.1:{self.port}", "-K", str(self.key), *args)
        assert r.returncode == 0, f"wormhole {' '.join(args)} -> {r.returncode}: {r.stderr}\n{self.logs()}"
        return r.stdout

    def notify_socket(self) -> socket.socket:
        """A NOTIFY_SOCKET for the daemon (its path is .getsockname())."""
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(self.path / f"notify{len(self.procs)}.sock"))
        notify.settimeout(0.1)
        return notify

    def wait_notify(self, notify: socket.socket, proc: subprocess.Popen, message: bytes) -> None:
        """Until the daemon sends message (READY=1, WATCHDOG=1) to notify; others are skipped."""
        deadline = time.monotonic() + 60 * SLOW
        while time.monotonic() < deadline:
            try:
                if notify.recv(100) == message:
                    return
            except TimeoutError:  # (what it sent before it exited is read first)
                assert proc.poll() is None, f"{proc.args} exited {proc.returncode}:\n{self.logs()}"
        raise AssertionError(f"{proc.args}: no {message!r} in 60 s:\n{self.logs()}")

    def start(self, *daemon: str) -> subprocess.Popen:
        """The daemon, started by `daemon` (./wormholed or ./wormhole daemon), until READY=1."""
        argv = [*daemon, "-H", f"127.0.0.1:{self.port}", "-K", str(self.key), "--state-dir", str(self.path / "state")]
        with self.notify_socket() as notify:
            proc = self.spawn(argv, {**self.env, "NOTIFY_SOCKET": notify.getsockname()})
            self.wait_notify(notify, proc, b"READY=1")
        self.pids += _children(proc.pid)
        return proc

    def spawn(self, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(argv, cwd=self.path, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log)
        self.procs.append(proc)
        return proc

    def echo_server(self, port: int) -> None:
        proc = subprocess.Popen([sys.executable, ECHO, "127.0.0.1", str(port)], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        assert proc.stdout.readline() == b"ready\n"

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for pid in self.pids:  # the bootloader's child, had the bootloader been killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture
def where(onefile):
    d = Dir(onefile)
    try:
        yield d
    finally:
        d.close()


def _through(port: int, data: bytes) -> bytes:
    """Send data to 127.0.0.1:port (from a thread, so that neither side blocks), then EOF;
    return what comes back until the other side closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
        sender.join()
    return b"".join(chunks)


def test_the_file_is_small_enough(onefile):
    assert onefile.stat().st_size < MAX_SIZE, f"{onefile}: {onefile.stat().st_size} bytes"


@pytest.mark.parametrize("daemon", [["./wormholed"], ["./wormhole", "daemon"]], ids=["symlink", "subcommand"])
def test_one_file_is_cli_and_daemon_and_passes_bytes(where, daemon):
    r = where.run("./wormhole", "keygen")
    assert r.returncode == 0 and len(r.stdout.split()) == 1, r.stderr
    where.key.write_text(r.stdout)
    where.key.chmod(0o600)
    r = where.run("./wormhole", "--help")
    assert r.returncode == 0 and "daemon" in r.stdout and "create" in r.stdout, r.stderr
    r = where.run(*daemon, "--help")
    assert r.returncode == 0 and r.stdout.startswith("Usage: wormholed"), r.stdout + r.stderr

    proc = where.start(*daemon)
    [pid] = where.pids
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f"{where.tmp}/_MEI" in maps and "/wormholed/_engine" in maps, "the engine from the unpacked file"
    assert str(ROOT) not in maps and sys.base_prefix not in maps, "nothing from the checkout or this Python"
    assert float(where.cli("ping")) > 0

    echo, head = _free_port(), _free_port()
    where.echo_server(echo)
    ident, url = where.cli("create", "url", f":{head}", "tail", "url", f":{echo}").split()
    assert url == f"tcp://127.0.0.1:{head}"
    data = random.randbytes(1 << 20)
    assert _through(head, data) == data
    [row] = json.loads(where.cli("list", "--json"))
    assert row["id"] == ident and row["bytes_in"] == row["bytes_out"] == len(data)
    assert where.cli("delete", ident) == ""
    assert json.loads(where.cli("list", "--json")) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", head), timeout=5).close()

    proc.send_signal(signal.SIGTERM)  # to the bootloader, which passes it on
    assert proc.wait(30 * SLOW) == 0, where.logs()
    assert not Path(f"/proc/{pid}").exists(), "the daemon itself is gone"
    logs = where.logs()
    assert "TCP engine: native" in logs and "stopping" in logs and "Traceback" not in logs, logs
    assert list(where.tmp.iterdir()) == [], "the unpacked copy is removed"


def test_under_systemd_socket_activation_ready_and_watchdog(where):
    """As the unit in systemd/ runs it: the file's bootloader is the main process and the
    daemon its child. The bootloader passes the listening socket on (LISTEN_PID), the daemon
    takes the watchdog over (WATCHDOG_PID names the bootloader: wormholed/onefile.py), and
    READY=1, WATCHDOG=1 and STOPPING=1 come from the child (hence NotifyAccess=all)."""
    where.key.write_text(where.run("./wormhole", "keygen").stdout)
    where.key.chmod(0o600)
    with where.notify_socket() as notify:
        # systemd-socket-activate execs (same pid) into sh, which execs into the bootloader:
        # $$ is the bootloader's pid, as WATCHDOG_PID would be under systemd.
        env = {**where.env, "NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "1000000"}
        proc = where.spawn(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{where.port}",
             *(f"--setenv={var}" for var in ("PATH", "TMPDIR", "NOTIFY_SOCKET", "WATCHDOG_USEC")),
             "/bin/sh", "-c", f'export WATCHDOG_PID=$$; exec ./wormholed -K {where.key} --state-dir state'], env)
        deadline = time.monotonic() + 60 * SLOW
        while (r := where.run("./wormhole", "-H", f"127.0.0.1:{where.port}", "-K", str(where.key), "ping")).returncode:
            assert time.monotonic() < deadline and proc.poll() is None, r.stderr + where.logs()
            time.sleep(0.2)  # (before systemd-socket-activate listens, or while the daemon starts)
        where.wait_notify(notify, proc, b"READY=1")
        where.pids += _children(proc.pid)
        where.wait_notify(notify, proc, b"WATCHDOG=1")
        assert "socket(s) from systemd" in where.logs() and "watchdog: WATCHDOG=1 every 0.5 s" in where.logs()
        proc.send_signal(signal.SIGTERM)
        where.wait_notify(notify, proc, b"STOPPING=1")
        assert proc.wait(30 * SLOW) == 0, where.logs()
    assert list(where.tmp.iterdir()) == [], "the unpacked copy is removed"
