"""wormholed as systemd runs it, without systemd as PID 1: the unit files checked by
`systemd-analyze verify`, socket activation by `systemd-socket-activate` (the tool
systemd ships for exactly this), and the watchdog and journal protocols spoken by the
real daemon to a test that plays the service manager (a datagram socket named by
NOTIFY_SOCKET, a log file named by JOURNAL_STREAM).

The watchdog must stop pinging when the event loop is stuck, not when the process is:
the test stops only the daemon's main thread (the loop's), with ptrace's
PTRACE_SEIZE + PTRACE_INTERRUPT, which, unlike SIGSTOP, leaves the other threads (the
native engine, helper threads) running. The daemon has no test-only code for this."""

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import ROOT, SLOW, WORMHOLED, recv_all

UNITS = ROOT / "systemd"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")  # the machine's, so that sysinit.target & co. resolve


def verify(root: Path, *units: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` offline: units looked up under `root`, no man pages checked.
    It exits 0 even for unknown keys and unparsable values (it only warns), so callers
    check its output too."""
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={root}", *map(str, units)],
                          capture_output=True, text=True, timeout=30)


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    """The unit files as shipped, in a root holding this machine's system units and an
    executable where ExecStart points (a stub: what runs there is tested below)."""
    etc = tmp_path / "etc/systemd/system"
    etc.mkdir(parents=True)
    for name in ("wormholed.service", "wormholed.socket"):
        shutil.copy(UNITS / name, etc / name)
    shutil.copytree(SYSTEM_UNITS, tmp_path / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    [exec_start] = re.findall(r"^ExecStart=(\S+)", (UNITS / "wormholed.service").read_text(), re.M)
    stub = tmp_path / exec_start.lstrip("/")
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    units = (etc / "wormholed.service", etc / "wormholed.socket")
    r = verify(tmp_path, *units)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # the check sees what is wrong: a bad value, and an ExecStart that does not exist
    units[0].write_text(units[0].read_text().replace("[Service]\n", "[Service]\nWatchdogSec=soon\n"))
    stub.unlink()
    r = verify(tmp_path, *units)
    assert "Failed to parse sec value" in r.stderr and f"Command {exec_start} is not executable" in r.stderr


def roundtrip(host, port: int, data: bytes = b"through the activated daemon") -> bytes:
    with host.connect(port) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_socket_activation_over_tcp_and_unix(make_host):
    """systemd-socket-activate binds a TCP port and a unix socket, starts wormholed at the
    first connection and hands it both; the CLI then works through either."""
    h = make_host(start=False)
    path = h.dir / "activated.sock"
    argv = ["systemd-socket-activate", "-l", "9999", "-l", str(path),
            WORMHOLED, "--state-dir", str(h.state)]
    h.daemon = h.popen(*argv, stdout=subprocess.DEVNULL, stderr=open(h.log, "ab"))
    deadline = time.monotonic() + 10 * SLOW
    while not path.exists() and time.monotonic() < deadline:
        assert h.daemon.poll() is None, h.logs()
        time.sleep(0.05)
    r = h.first_ping("tcp://127.0.0.1:9999")  # the first connection starts the daemon
    assert r.returncode == 0, r.stderr + h.logs()
    deadline = time.monotonic() + 10 * SLOW  # the control socket answers before start-up is logged
    while "listening on 2 socket(s)" not in h.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "listening on 2 socket(s) from systemd" in h.logs()
    h.echo_server(7000)
    r = h.wormhole("create", "url", ":8000", "tail", "url", ":7000", host=f"unix://{path}")
    assert r.returncode == 0, r.stderr + h.logs()
    ident, url = r.stdout.split()
    assert url == "tcp://127.0.0.1:8000"
    assert roundtrip(h, 8000) == b"through the activated daemon"
    listed = h.wormhole("list", host="[::1]:9999")  # systemd's ListenStream=9999 is dual-stack
    assert listed.returncode == 0 and ident in listed.stdout, listed.stderr
    assert h.stop() == 0


class StoppedThread:
    """Stop one thread (not its process) for the block: PTRACE_SEIZE, PTRACE_INTERRUPT,
    wait for the stop; PTRACE_DETACH after, even on failure. Root only."""
    SEIZE, INTERRUPT, DETACH = 0x4206, 0x4207, 17
    WALL = 0x40000000

    def __init__(self, tid: int):
        self.tid = tid
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.libc.ptrace.restype = ctypes.c_long

    def _ptrace(self, request: int, what: str) -> None:
        if self.libc.ptrace(request, self.tid, None, None) == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({what}) of {self.tid}: {os.strerror(err)}")

    def __enter__(self):
        self._ptrace(self.SEIZE, "PTRACE_SEIZE")
        try:
            self._ptrace(self.INTERRUPT, "PTRACE_INTERRUPT")
            _, status = os.waitpid(self.tid, self.WALL)
            assert os.WIFSTOPPED(status), f"thread {self.tid} not stopped: status {status:#x}"
        except BaseException:
            self.__exit__(True)
            raise
        return self

    def __exit__(self, failed, *_):
        try:
            self._ptrace(self.DETACH, "PTRACE_DETACH")
        except OSError:
            if not failed:  # else the failure that is on its way counts, not this one
                raise


def thread_states(pid: int) -> dict[int, str]:
    """{tid: state letter from /proc/PID/task/TID/stat} of a process's threads."""
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
    return states


def datagrams(sock: socket.socket, seconds: float) -> list[bytes]:
    """What arrives on sock within `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(100))
        except TimeoutError:
            break
    return got


@pytest.fixture
def manager(tmp_path):
    """The service manager's end of NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_watchdog_pings_come_from_the_event_loop(make_host, manager):
    """WATCHDOG_USEC=400000: WATCHDOG=1 every 0.2 s after READY=1; none while the loop's
    thread is stopped though the process's other threads run; again once it runs; and
    SIGABRT, what systemd sends at a watchdog timeout, dumps the threads' stacks."""
    h = make_host(start=False)
    env = dict(os.environ, NOTIFY_SOCKET=manager.getsockname(), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)  # (systemd sets it to the daemon's pid, unknown before the start)
    daemon = h.start(env=env, wait=False)
    manager.settimeout(15 * SLOW)
    assert manager.recv(100) == b"READY=1", h.logs()
    pings = datagrams(manager, 1.0)
    assert set(pings) == {b"WATCHDOG=1"} and len(pings) >= 3, pings
    assert "wormholed: INFO watchdog: WATCHDOG=1 every 0.2 s" in h.logs()  # not the journal's format

    with StoppedThread(daemon.pid):
        states = thread_states(daemon.pid)
        assert states.pop(daemon.pid) == "t"  # the loop's thread: stopped by us
        assert states and "t" not in states.values() and "T" not in states.values(), states
        datagrams(manager, 0.1)  # drain the pings sent before the stop (none come after it)
        assert datagrams(manager, 1.2) == []  # 6 intervals, 3 watchdog timeouts
    assert datagrams(manager, 1.0).count(b"WATCHDOG=1") >= 3
    assert h.wormhole("ping").returncode == 0

    daemon.send_signal(signal.SIGABRT)
    assert daemon.wait(10 * SLOW) == -signal.SIGABRT
    log = h.logs()
    assert "Fatal Python error: Aborted" in log and "most recent call first" in log, log


def test_watchdog_of_another_process_is_ignored(make_host, manager):
    """WATCHDOG_PID names another process (a variable inherited from a watched parent)."""
    h = make_host(start=False)
    h.start(env=dict(os.environ, NOTIFY_SOCKET=manager.getsockname(), WATCHDOG_USEC="400000",
                     WATCHDOG_PID="1"), wait=False)
    manager.settimeout(15 * SLOW)
    assert manager.recv(100) == b"READY=1", h.logs()
    assert datagrams(manager, 0.6) == []
    assert h.stop() == 0


def test_logs_on_the_journal_stream_carry_priorities(make_host):
    """When stderr is the stream JOURNAL_STREAM names, lines are `<6>message`: journald adds
    time, unit and process and reads the priority; a stderr elsewhere keeps the plain format
    (the other tests here)."""
    h = make_host(start=False)
    h.log.touch()
    st = h.log.stat()
    h.start(env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    assert h.stop() == 0
    lines = h.logs().splitlines()
    assert "<6>TCP engine: native" in lines or "<6>TCP engine: python (WORMHOLE_ENGINE=python)" in lines, lines
    assert any(line.startswith("<6>listening on ") for line in lines), lines
    assert "<6>stopping" in lines and not [line for line in lines if "wormholed:" in line], lines
