"""Containers (issue 4) against a real dockerd and the stand-in images of examples/images."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import docker
import pytest

from harness import ROOT, recv_all, veth
from test_wormholes import refused
from test_wormholes import roundtrip as _roundtrip

LABEL = "org.wormhole.daemon"


def roundtrip(ns, port, data=b"hello wormhole"):
    """Bytes there and back through a wormhole, with room for a trigger's container to start
    and the dial retries after it (the harness's 10 s can be short on a loaded machine)."""
    return _roundtrip(ns, port, data, timeout=60)


@pytest.fixture(scope="module")
def engine():
    client = docker.from_env()
    client.ping()
    for image in ("wormhole/mysql", "wormhole/wordpress"):
        client.images.get(image)  # built by examples/images/build.sh (make test does it)
    yield client
    client.close()


@pytest.fixture
def containers(engine):
    """Start containers for a test; all removed afterwards."""
    made = []

    def run(image, **kw):
        c = engine.containers.run(image, detach=True, **kw)
        made.append(c)
        return c
    yield run
    for c in made:
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass


def ours(engine, host):
    """The containers host's daemon started and has not removed. Listed, then inspected one by
    one, skipping any the daemon removed in between (the SDK's containers.list would raise)."""
    daemon_id = (host.state / "daemon-id").read_text().strip()
    found = []
    for summary in engine.api.containers(all=True, filters={"label": f"{LABEL}={daemon_id}"}):
        try:
            found.append(engine.containers.get(summary["Id"]))
        except docker.errors.NotFound:
            pass
    return found


@pytest.fixture
def sweep(engine):
    """Containers wormholed started for a test's hosts are gone afterwards, whatever happened."""
    hosts = []
    yield hosts.append
    for host in hosts:
        if (host.state / "daemon-id").exists():
            for c in ours(engine, host):
                c.remove(force=True)


def in_container(container, port, data=b"hello container"):
    """Send bytes to 127.0.0.1:port inside the container's namespace; return the reply."""
    pid = container.attrs["State"]["Pid"]
    with open("/proc/thread-self/ns/net") as home, open(f"/proc/{pid}/ns/net") as there:
        os.setns(there.fileno(), os.CLONE_NEWNET)
        try:
            s = socket.socket()
        finally:
            os.setns(home.fileno(), os.CLONE_NEWNET)
    with s:
        s.settimeout(15)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_docker_ns_tail(host, containers):
    mysql = containers("wormhole/mysql")
    host.create("url", ":3306", "tail", "docker-ns", mysql.id)
    assert roundtrip(host, 3306) == b"hello wormhole"
    assert host.list()[0]["tail"] == f"tcp://docker:{mysql.name}@127.0.0.1:3306"


def test_a_restarted_docker_ns_tail_is_followed(host, containers):
    """`docker restart` gives the container a new network namespace: the wormhole lets go of
    the old one when the container's process exits, and the next connection finds the new one."""
    mysql = containers("wormhole/mysql")
    host.create("url", ":3306", "tail", "docker-ns", mysql.name)
    assert roundtrip(host, 3306) == b"hello wormhole"
    for _ in range(2):
        mysql.restart(timeout=1)
        assert roundtrip(host, 3306) == b"hello wormhole"
    assert f"container {mysql.name!r} stopped or restarted" in host.logs()
    mysql.stop(timeout=1)
    assert refused(host, 3306)
    [row] = host.list()
    assert row["state"] == "armed"
    mysql.start()
    assert roundtrip(host, 3306) == b"hello wormhole"


def test_a_wormhole_whose_container_is_gone_at_start_is_listed_failed_and_deletable(host, containers):
    mysql = containers("wormhole/mysql")
    ident, _ = host.create("url", ":3306", "tail", "docker-ns", mysql.name)
    host.stop()
    mysql.remove(force=True)
    host.start()
    [row] = host.list()
    assert row["id"] == ident and row["state"] == "failed" and f"no container {mysql.name!r}" in row["reason"]
    assert not host.listening(3306)
    host.ok("delete", ident)
    assert host.list() == []
    host.stop()
    host.start()
    assert host.list() == [], "gone for good"


def test_docker_ns_head_by_name(host, containers):
    app = containers("wormhole/wordpress")
    host.echo_server(7300)
    app.reload()
    host.create("url", ":3306", "docker-ns", app.name, "tail", "url", ":7300")
    assert in_container(app, 3306) == b"hello container"


def test_missing_or_stopped_container_refused(host, containers):
    r = host.wormhole("create", "url", ":3306", "tail", "docker-ns", "no-such-container")
    assert r.returncode == 1 and "no container 'no-such-container'" in r.stderr
    stopped = containers("wormhole/mysql")
    stopped.stop(timeout=1)
    r = host.wormhole("create", "url", ":3306", "docker-ns", stopped.id[:12], "tail", "url", ":7000")
    assert r.returncode == 1 and "is not running" in r.stderr and r.stderr.count("\n") == 1
    assert host.list() == [] and not host.listening(3306)


def test_docker_run_removed_on_delete_and_on_sigterm(host, engine, sweep):
    sweep(host)
    name = f"wh-test-{uuid.uuid4().hex[:8]}"
    host.create("id", "db", "url", ":3306", "tail", "docker-run", f"--name {name} -e ROLE=test wormhole/mysql")
    [c] = ours(engine, host)
    assert c.name == name and "ROLE=test" in c.attrs["Config"]["Env"]
    assert c.labels["org.wormhole.wormhole"] == "db"
    assert roundtrip(host, 3306) == b"hello wormhole"
    host.ok("delete", "db")
    assert ours(engine, host) == []
    host.create("id", "db2", "url", ":3306", "tail", "docker-run", "wormhole/mysql")
    assert len(ours(engine, host)) == 1
    assert host.stop() == 0
    assert ours(engine, host) == [], "SIGTERM removes the containers wormholes started"


def test_trigger_docker_run_starts_exactly_one_container(host, engine, sweep):
    sweep(host)
    host.create("id", "lazy", "url", ":3306", "trigger", "docker-run", "wormhole/mysql")
    assert ours(engine, host) == [] and host.list()[0]["state"] == "armed"
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda i: roundtrip(host, 3306, b"conn %d" % i), range(10)))
    assert replies == [b"conn %d" % i for i in range(10)]
    assert len(ours(engine, host)) == 1
    host.ok("delete", "lazy")
    assert ours(engine, host) == []


def test_failing_trigger_then_succeeding(host, engine, sweep):
    sweep(host)
    tag = f"wormhole/late-{uuid.uuid4().hex[:8]}"
    host.create("id", "late", "url", ":3306", "trigger", "docker-run", tag)
    assert refused(host, 3306), "no such image yet: the waiting connection is closed"
    assert "trigger failed" in host.logs() and tag in host.logs()
    image = engine.images.get("wormhole/mysql")
    image.tag(tag)
    try:
        assert roundtrip(host, 3306) == b"hello wormhole", "the next connection tries again"
        assert len(ours(engine, host)) == 1
    finally:
        host.ok("delete", "late")
        engine.images.remove(tag)


def test_bad_docker_run_args_refused_by_the_cli(host):
    r = host.wormhole("create", "url", ":80", "tail", "docker-run", "-p 80:80 wormhole/wordpress")
    assert r.returncode == 2 and "unknown option '-p'" in r.stderr


def run_example(ns, script, env=None, timeout=120):
    env = {**os.environ, **(env or {})}
    r = ns.exec(str(ROOT / "examples" / script), env=env, timeout=timeout)
    assert r.returncode == 0, f"{script} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.parametrize("script,expect", [
    ("ex1-local-mysql.sh", "echo: hello mysql"),
    ("ex2-wordpress-to-mysql.sh", "page: wordpress: database ok"),
    ("ex3-on-demand.sh", "page: wordpress: database ok"),
])
def test_readme_examples(host, engine, sweep, script, expect):
    sweep(host)
    before = {c["Id"] for c in engine.api.containers(all=True)}
    assert expect in run_example(host, script)
    assert host.list() == [], "the example deletes its wormholes"
    assert {c["Id"] for c in engine.api.containers(all=True)} == before, "and its containers"


def test_readme_example_4_remote(make_host, engine, sweep):
    h1, h2 = make_host(key="k"), make_host(key="k")
    sweep(h2)
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    out = run_example(h1, "ex4-remote-mysql.sh",
                      {"MYSERVER": "192.0.2.2", "MYSERVER_DOCKER": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")})
    assert "echo: hello mysql" in out
    assert h1.list() == [] and h2.list() == []


def test_restart_after_a_crash_removes_strays_and_rebuilds(host, engine, sweep):
    sweep(host)
    host.create("id", "crashy", "url", ":3306", "tail", "docker-run", "wormhole/mysql")
    [old] = ours(engine, host)
    host.stop(signal.SIGKILL)  # no teardown: the container is left behind
    assert [c.id for c in ours(engine, host)] == [old.id]
    host.start()
    assert "removed 1 stray container" in host.logs()
    [new] = ours(engine, host)
    assert new.id != old.id, "the stray is gone; the restored wormhole ran its own"
    assert roundtrip(host, 3306) == b"hello wormhole"


def test_docker_host_is_followed(make_host, containers, tmp_path):
    mysql = containers("wormhole/mysql")
    link = tmp_path / "engine.sock"
    link.symlink_to("/var/run/docker.sock")
    good = make_host(start=False)
    good.start(env={**os.environ, "DOCKER_HOST": f"unix://{link}"})
    good.create("url", ":3306", "tail", "docker-ns", mysql.name)
    assert roundtrip(good, 3306) == b"hello wormhole"
    bad = make_host(start=False)
    bad.start(env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"})
    r = bad.wormhole("create", "url", ":3306", "tail", "docker-ns", mysql.name)
    assert r.returncode == 1 and f"unix://{tmp_path}/nothing.sock" in r.stderr and r.stderr.count("\n") == 1


def test_sigterm_during_a_create_leaves_no_container(make_host, make_ns, engine, sweep):
    """The daemon cancels a create still running at SIGTERM and undoes what it built: here a
    container is started, then the create waits on a peer that never answers."""
    import subprocess

    from harness import WORMHOLE
    host = make_host()
    sweep(host)
    far = make_ns()
    veth(host, "192.0.2.1/24", far, "192.0.2.2/24")
    # 192.0.2.99 is silent: its SYNs leave (a permanent neighbour entry, so no ARP failure ends
    # the dial early) and the far namespace, which does not own the address, drops them. The
    # create then waits the peer timeout (5 s) on it.
    host.exec("ip", "neigh", "replace", "192.0.2.99", "lladdr", "02:00:00:00:00:99", "nud", "permanent",
              "dev", f"{host.name}-{far.name}"[-15:], check=True)
    cli = host.popen(WORMHOLE, "-H", host.sock, "create", "id", "slow", "url", ":3306", "tail", "docker-run",
                     "wormhole/mysql", "chain", "url", ":4000", "remote", "192.0.2.99",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while "started container" not in host.logs() and cli.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "started container" in host.logs(), "the container is started before the peer is asked"
    assert host.stop() == 0
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 1 and err.count(b"\n") == 1, err
    assert b"lost the connection" in err and b"192.0.2.99" not in err, "cancelled, not left to finish"
    assert ours(engine, host) == [], "the cancelled create removed its container"
    host.start()
    assert host.list() == [], "and recorded nothing"


def test_unix_sockets_in_a_container_and_a_docker_ns_tail_among_several(host, containers):
    """A unix socket path names a file in the container's own filesystem."""
    mysql = containers("wormhole/mysql")
    host.create("id", "in", "url", f"unix://docker:{mysql.name}@/db.sock", "tail", "docker-ns", mysql.name,
                "url", ":3306")
    mysql.reload()
    inside = f"/proc/{mysql.attrs['State']['Pid']}/root/db.sock"
    st = os.lstat(inside)
    assert oct(st.st_mode & 0o777) == "0o660" and not os.path.exists("/db.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(inside)
        s.sendall(b"through the file")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"through the file"
    host.create("url", ":8300", "tail", "url", f"unix://docker:{mysql.name}@/db.sock")
    assert roundtrip(host, 8300) == b"hello wormhole"
    host.echo_server(7301)
    host.create("id", "lb", "url", ":8301", "tail", "url", ":7301", "add-tail", "docker-ns", mysql.name,
                "url", ":3306")
    for _ in range(4):
        assert roundtrip(host, 8301) == b"hello wormhole"
    [lb] = [r for r in host.list() if r["id"] == "lb"]
    assert [t["total"] for t in lb["tails"]] == [2, 2]
    assert lb["tails"][1]["url"] == f"tcp://docker:{mysql.name}@127.0.0.1:3306"
    host.ok("delete", "in")
    assert not os.path.exists(inside), "the socket file goes with the wormhole"


def test_a_takeover_adopts_the_containers_docker_run_started(host, engine, sweep):
    """The successor takes the container over with its connections: not removed, not run again."""
    sweep(host)
    host.create("id", "db", "url", ":3306", "trigger", "docker-run", "wormhole/mysql")
    assert roundtrip(host, 3306) == b"hello wormhole"  # the trigger ran: the container is up
    held = host.connect(3306)
    held.sendall(b"before ")
    [before] = ours(engine, host)
    old = host.daemon
    host.start("--takeover")
    assert old.wait(30) == 0
    held.sendall(b"after")
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"before after"
    assert [c.id for c in ours(engine, host)] == [before.id], "the same container, not a new one"
    assert roundtrip(host, 3306) == b"hello wormhole"
    host.ok("delete", "db")
    assert ours(engine, host) == []


_ASK_ON_A_LINE = """import json, socket, sys
from wormholed.handover import transfer
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
s.send(json.dumps({"hello": {"versions": [1]}}).encode())
record, fds = transfer.receive(s)
print(len(fds), flush=True)
"""  # a successor that asks once told to, takes the handover, and leaves without committing


def test_a_handover_while_a_trigger_starts_a_container_leaves_one_container(host, engine, sweep):
    """The trigger is stopped, what it started removed, its waiting client handed over; here the
    successor takes the handover and leaves, so the old daemon takes it all back, runs the
    trigger again, and serves the client through one container."""
    sweep(host)
    host.create("id", "db", "url", ":3306", "trigger", "docker-run", "wormhole/mysql")
    asker = host.popen(sys.executable, "-c", _ASK_ON_A_LINE, str(host.state / "handover.sock"),
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert asker.stdout.readline() == "connected\n"
        waiting = host.connect(3306, timeout=60)  # the trigger starts the container
        waiting.sendall(b"waiting ")
        asker.stdin.write("go\n")
        asker.stdin.flush()
        assert int(asker.stdout.readline()) >= 2
    finally:
        asker.kill()
        asker.wait()
    with waiting:
        waiting.sendall(b"client")
        waiting.shutdown(socket.SHUT_WR)
        assert recv_all(waiting) == b"waiting client"
    logs = host.logs()
    assert "its trigger is running: stopped" in logs and "did not take over" in logs, logs
    assert len(ours(engine, host)) == 1, "the first container removed, one running"
    assert roundtrip(host, 3306) == b"hello wormhole"
    host.ok("delete", "db")
    assert ours(engine, host) == []
