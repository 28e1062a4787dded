"""wormholed._engine connecting its tails inside another network namespace (root: `ip netns add`)."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import threading

import pytest

from wormholed import engine as _engine
from fds import no_new_fds

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates a network namespace")

LOCAL = "127.0.0.1"


@pytest.fixture
def netns():
    """A named namespace with lo up; removed afterwards, whatever happened."""
    name = f"wh-engine-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)  # maybe deleted already


@pytest.fixture(autouse=True)
def no_fd_leak():
    with no_new_fds():
        yield


def listening_in(name: str, host: str = LOCAL) -> socket.socket:
    """A listening socket made inside namespace `name` (on a throwaway thread)."""
    result = []

    def make():
        with open(f"/run/netns/{name}") as ns:
            os.setns(ns.fileno(), os.CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
            sock.listen(128)
            result.append(sock)
        except OSError as exc:
            result.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def head(eng) -> tuple[int, tuple]:
    sock = socket.socket()
    sock.bind((LOCAL, 0))
    sock.listen(128)
    sock.setblocking(False)
    with sock:
        return eng.listen(sock.fileno()), sock.getsockname()


def relayed(addr, server: socket.socket, payload: bytes) -> None:
    with socket.create_connection(addr, timeout=10) as client:
        server.settimeout(10)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            client.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += conn.recv(65536)
            assert got == payload
            conn.sendall(payload[::-1])
            got = b""
            while len(got) < len(payload):
                got += client.recv(65536)
            assert got == payload[::-1]


def engine_thread_netns() -> str:
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "wormhole-engine":
                return os.readlink(f"/proc/self/task/{tid}/ns/net")
    raise AssertionError("no engine thread")


def test_tails_are_made_in_the_target_namespace_and_the_thread_comes_home(netns):
    home = os.readlink("/proc/self/ns/net")
    eng = _engine.Engine()
    server = listening_in(netns)
    home_server = socket.socket()
    home_server.bind((LOCAL, 0))
    home_server.listen(128)
    try:
        port = server.getsockname()[1]
        lid, addr = head(eng)
        with open(f"/run/netns/{netns}") as ns:
            eng.set_target(lid, socket.AF_INET, LOCAL, port, ns.fileno())
        for i in range(70):  # past two batches of spares
            relayed(addr, server, b"through the namespace %d" % i)
        assert eng.stats(lid)[1] == 70
        assert engine_thread_netns() == home
        assert os.readlink("/proc/thread-self/ns/net") == home
        # another listener whose target is in the engine's own namespace
        lid2, addr2 = head(eng)
        eng.set_target(lid2, socket.AF_INET, LOCAL, home_server.getsockname()[1])
        relayed(addr2, home_server, b"at home")
        # the same listener, retargeted home: its spares from the namespace are dropped
        eng.set_target(lid, socket.AF_INET, LOCAL, home_server.getsockname()[1])
        relayed(addr, home_server, b"retargeted")
        eng.unlisten(lid)
        eng.unlisten(lid2)
    finally:
        eng.close()
        server.close()
        home_server.close()


def test_a_refused_connect_inside_the_namespace_is_handed_off(netns):
    eng = _engine.Engine()
    probe = listening_in(netns)
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    try:
        lid, addr = head(eng)
        with open(f"/run/netns/{netns}") as ns:
            eng.set_target(lid, socket.AF_INET, LOCAL, port, ns.fileno())
        with socket.create_connection(addr, timeout=10):
            assert select.select([eng.fileno()], [], [], 10)[0]
            [(got_lid, fd, err)] = eng.handoffs()
            os.close(fd)
            assert (got_lid, err) == (lid, errno.ECONNREFUSED)
    finally:
        eng.close()


def test_the_namespace_stays_usable_after_ip_netns_del(netns):
    """The engine holds its own fd of the namespace (and spares made in it)."""
    eng = _engine.Engine()
    server = listening_in(netns)
    try:
        lid, addr = head(eng)
        with open(f"/run/netns/{netns}") as ns:
            eng.set_target(lid, socket.AF_INET, LOCAL, server.getsockname()[1], ns.fileno())
        subprocess.run(["ip", "netns", "del", netns], check=True)
        for i in range(40):
            relayed(addr, server, b"still there %d" % i)
        with contextlib.suppress(ValueError):
            eng.unlisten(lid)
    finally:
        eng.close()
        server.close()
