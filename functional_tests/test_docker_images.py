"""The stand-in images of examples/images/: wormhole/mysql echoes on 3306 and
wormhole/wordpress serves its page only when 127.0.0.1:3306 inside its own network
namespace echoes. Needs a Docker engine at $DOCKER_HOST (`make test` starts one)."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import docker
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "examples" / "images" / "build.sh"
_names = itertools.count()


@pytest.fixture(scope="module")
def client():
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:      # DockerException, or requests' ConnectionError from ping()
        pytest.fail(f"no Docker engine answers at {os.environ.get('DOCKER_HOST') or 'the default socket'} "
                    f"(scripts/docker-up starts one): {e}")
    # Up to date images are left alone, so this costs a fraction of a second.
    built = subprocess.run([str(BUILD)], capture_output=True, text=True)
    if built.returncode:
        pytest.fail(f"{BUILD} failed:\n{built.stdout}{built.stderr}")
    yield client
    client.close()


@pytest.fixture
def run(client):
    """run(image) starts a container and returns its PID 1; all are force-removed after."""
    containers = []

    def start(image: str) -> int:
        container = client.containers.run(
            image, detach=True, name=f"wormhole-test-{os.getpid()}-{next(_names)}",
            labels={"wormhole.test": "test_docker_images"})
        containers.append(container)
        container.reload()       # the object run() returns predates the start: no PID yet
        pid = container.attrs["State"]["Pid"]
        assert container.status == "running" and pid > 0, container.logs()
        return pid

    yield start
    for container in containers:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def socket_in(pid: int) -> socket.socket:
    """A TCP socket in the network namespace of process `pid`: it stays there for its whole
    life, so it is used from here like any other socket."""
    with open("/proc/thread-self/ns/net") as home, open(f"/proc/{pid}/ns/net") as there:
        os.setns(there.fileno(), os.CLONE_NEWNET)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            os.setns(home.fileno(), os.CLONE_NEWNET)


def connect_in(pid: int, port: int, timeout: float = 10) -> socket.socket:
    """Connects to 127.0.0.1:port inside the namespace, waiting for the server to listen."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket_in(pid)
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def get(pid: int, port: int = 80) -> tuple[int, str]:
    """GET / on 127.0.0.1:port in the namespace: (status, body)."""
    with connect_in(pid, port) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        response = read_all(s).decode()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


@contextlib.contextmanager
def echo_listener_in(pid: int, port: int):
    """An echo service on 127.0.0.1:port inside the namespace, for the block's duration."""
    listener = socket_in(pid)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_mysql_echoes_on_3306(run):
    pid = run("wormhole/mysql")
    for message in (b"hello wormhole\n", b"again, on a new connection\n" * 100):
        with connect_in(pid, 3306) as s:
            s.sendall(message)
            s.shutdown(socket.SHUT_WR)
            assert read_all(s) == message


def test_mysql_listens_only_in_its_own_namespace(run):
    pid = run("wormhole/mysql")
    connect_in(pid, 3306).close()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", 3306))     # nothing in this test's namespace (no -p, no bridge)


def test_wordpress_needs_its_database_on_local_3306(run):
    pid = run("wormhole/wordpress")
    assert get(pid) == (503, "wordpress: database unreachable\n")
    with echo_listener_in(pid, 3306):
        assert get(pid) == (200, "wordpress: database ok\n")
        assert get(pid) == (200, "wordpress: database ok\n")
    assert get(pid) == (503, "wordpress: database unreachable\n")


def test_wordpress_with_mysql_in_its_namespace(client, run):
    """What a wormhole child does, done by hand: 127.0.0.1:3306 in the wordpress container
    reaches the mysql container."""
    mysql = run("wormhole/mysql")
    wordpress = run("wormhole/wordpress")
    connect_in(mysql, 3306).close()
    assert get(wordpress)[0] == 503

    listener = socket_in(wordpress)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 3306))
    listener.listen(8)
    stop = threading.Event()

    def relay():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                inside, _ = listener.accept()
            except TimeoutError:
                continue
            with inside, connect_in(mysql, 3306) as outside:
                inside.settimeout(5)
                with contextlib.suppress(OSError):
                    while data := inside.recv(65536):
                        outside.sendall(data)
                    outside.shutdown(socket.SHUT_WR)
                    while data := outside.recv(65536):
                        inside.sendall(data)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        assert get(wordpress) == (200, "wordpress: database ok\n")
    finally:
        stop.set()
        thread.join(5)
        listener.close()
