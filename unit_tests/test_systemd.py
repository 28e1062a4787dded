"""systemd glue: notifications are best-effort; LISTEN_FDS only for this process."""

import os
import socket

from wormholed import systemd


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


def test_the_unit_lets_wireguard_go_outlive_the_daemon():
    """wireguard-go runs in the daemon's control group under systemd; the default KillMode
    would kill it with the daemon, and tunnels must outlive it."""
    import configparser
    from pathlib import Path
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).parent.parent / "systemd" / "wormholed.service")
    assert unit["Service"]["KillMode"] == "process" and unit["Service"]["Type"] == "notify"
