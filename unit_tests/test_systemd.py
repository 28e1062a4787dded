"""systemd glue: notifications are best-effort; LISTEN_FDS and WATCHDOG_USEC only for this
process; the watchdog pings only while the event loop runs; journal format only on the
journal stream systemd gave us."""

import asyncio
import configparser
import io
import logging
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import uvloop

from wormholed import systemd

UNITS = Path(__file__).parent.parent / "systemd"


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing for the service manager, named by NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield s


def received(s: socket.socket) -> list[bytes]:
    """The datagrams queued on s, without waiting."""
    got = []
    while True:
        try:
            got.append(s.recv(100))
        except BlockingIOError:
            return got


def test_notify_sends_and_tolerates_a_missing_manager(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1") and s.recv(100) == b"READY=1"
    os.unlink(path)
    assert systemd.notify("STOPPING=1") is False  # gone: no exception
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.notify("READY=1") is False


def test_listen_fds_for_another_pid_are_ignored_and_cleared(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_sockets() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


@pytest.mark.parametrize("env, interval", [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),                      # no WATCHDOG_PID: ours
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4242"}, 0.2),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "4243"}, None),  # another process's
    ({"WATCHDOG_USEC": "0", "WATCHDOG_PID": "4242"}, None),
    ({"WATCHDOG_USEC": "soon", "WATCHDOG_PID": "4242"}, None),
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "me"}, None),
])
def test_watchdog_interval_is_half_the_managers_and_only_for_this_process(env, interval):
    assert systemd.watchdog_interval(env, pid=4242) == interval


def test_watchdog_pings_only_while_the_loop_runs(notify_socket):
    async def scenario():
        dog = systemd.Watchdog(asyncio.get_running_loop(), 0.05).start()
        await asyncio.sleep(0.4)
        running = received(notify_socket)
        time.sleep(0.4)  # the loop is stuck: its timer cannot fire
        stuck = received(notify_socket)
        await asyncio.sleep(0.2)
        resumed = received(notify_socket)
        dog.stop()
        await asyncio.sleep(0.2)
        return running, stuck, resumed, received(notify_socket)

    running, stuck, resumed, stopped = uvloop.run(scenario())
    assert set(running) == {b"WATCHDOG=1"} and len(running) >= 4, running
    assert stuck == []
    assert resumed and set(resumed) == {b"WATCHDOG=1"}
    assert stopped == []


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path):
    log, other = tmp_path / "log", tmp_path / "other"
    with open(log, "w") as stream, open(other, "w") as elsewhere:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert systemd.journal_stream(env, stream)
        assert not systemd.journal_stream(env, elsewhere)  # stderr redirected: not the journal
        assert not systemd.journal_stream({}, stream)
        assert not systemd.journal_stream({"JOURNAL_STREAM": "8:"}, stream)
        assert not systemd.journal_stream(env, io.StringIO())  # no file descriptor


def emit(handler: logging.Handler, level: int, msg: str, exc_info=None) -> None:
    logger = logging.Logger("wormholed-test")
    logger.addHandler(handler)
    logger.log(level, msg, exc_info=exc_info)


def test_journal_lines_carry_priorities_and_nothing_journald_adds(tmp_path):
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        handler = systemd.log_handler(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG):
            emit(handler, level, f"at {logging.getLevelName(level)}")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            emit(handler, logging.ERROR, "failed", exc_info=sys.exc_info())
    lines = path.read_text().splitlines()
    assert lines[:5] == ["<2>at CRITICAL", "<3>at ERROR", "<4>at WARNING", "<6>at INFO", "<7>at DEBUG"]
    assert lines[5] == "<3>failed" and lines[-1] == "<3>RuntimeError: boom"
    assert all(line.startswith("<3>") for line in lines[5:])  # the traceback stays an error


def test_outside_systemd_the_format_is_unchanged(tmp_path):
    stream = io.StringIO()
    emit(systemd.log_handler(stream, {}), logging.WARNING, "careful")
    assert stream.getvalue() == "wormholed: WARNING careful\n"


def unit(name: str) -> configparser.ConfigParser:
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.read(UNITS / name)
    return parsed


def test_the_unit_lets_wireguard_go_outlive_the_daemon():
    """wireguard-go runs in the daemon's control group under systemd; the default KillMode
    would kill it with the daemon, and tunnels must outlive it."""
    service = unit("wormholed.service")["Service"]
    assert service["KillMode"] == "process" and service["Type"] == "notify"


def test_the_unit_watches_the_daemon_and_restarts_it():
    """A watchdog timeout is a failure, so Restart=on-failure restarts a stuck daemon."""
    service = unit("wormholed.service")["Service"]
    assert service["WatchdogSec"] == "30s" and service["Restart"] == "on-failure"
