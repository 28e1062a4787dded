"""Wormholes that span hosts (issue 3): test hosts joined by veth, each its own daemon and key."""

import os
import re
import signal
import socket
import time

import pytest

from harness import recv_all, veth
from test_wormholes import port_of, refused, roundtrip


@pytest.fixture
def pair(make_host):
    """h1 (192.0.2.1, 2001:db8::1) <-> h2 (192.0.2.2, 2001:db8::2), same key."""
    h1 = make_host(key="shared-key")
    h2 = make_host(key="shared-key")
    veth(h1, "192.0.2.1/24,2001:db8::1/64", h2, "192.0.2.2/24,2001:db8::2/64")
    return h1, h2


def test_ping_through_to_the_peer(pair):
    h1, h2 = pair
    out = h1.ok("ping", "192.0.2.2")
    assert re.fullmatch(r"\d+\.\d+\n", out)


def test_remote_wormhole_carries_a_mebibyte_with_half_close(pair):
    h1, h2 = pair
    h2.echo_server(3306)
    ident, url = h1.create("id", "db", "url", ":3306", "remote", "192.0.2.2")
    assert url == "tcp://127.0.0.1:3306"
    [far] = h2.list()
    assert re.fullmatch(r"db\.1\.[0-9a-f]{8}", far["id"]), "the owner's tag is part of a remote child's id"
    assert far["head"].startswith("tcp://192.0.2.2:") and far["parent"] == "db@192.0.2.1"
    assert far["tail"] == "tcp://127.0.0.1:3306", "the service-port rule carries 3306 across"
    [near] = h1.list()
    assert near["child"] == f"{far['id']}@192.0.2.2" and near["remote"] == "192.0.2.2"
    assert near["tail"] == far["head"]
    assert f"{far['id']}@192.0.2.2" in h1.ok("list")
    data = os.urandom(1 << 20)
    with h1.connect(3306) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == data
    assert h1.list()[0]["bytes_in"] == h1.list()[0]["bytes_out"] == len(data)


def test_remote_with_explicit_tail_url(pair):
    h1, h2 = pair
    h2.echo_server(3307)
    h1.create("url", ":3307", "remote", "192.0.2.2", "tail", "url", ":3307")
    assert roundtrip(h1, 3307) == b"hello wormhole"


def test_trigger_remote_builds_the_child_on_first_connection(pair):
    h1, h2 = pair
    h2.echo_server(7001)
    h1.create("id", "lazy", "url", ":8001", "trigger", "remote", "192.0.2.2", "tail", "url", ":7001")
    assert h2.list() == [] and h1.list()[0]["state"] == "armed"
    assert roundtrip(h1, 8001) == b"hello wormhole"
    assert [r["id"].rsplit(".", 1)[0] for r in h2.list()] == ["lazy.1"]


def test_delete_cascades_to_the_far_host(pair):
    h1, h2 = pair
    h2.echo_server(7002)
    h1.create("id", "casc", "url", ":8002", "remote", "192.0.2.2", "tail", "url", ":7002")
    far_port = port_of(h2.list()[0]["head"])
    r = h1.wormhole("delete", "casc")
    assert r.returncode == 0 and r.stderr == ""
    assert h2.list() == [] and not h2.listening(far_port, "192.0.2.2")


def test_daemon_shutdown_removes_remote_children(pair):
    h1, h2 = pair
    h1.create("id", "sd", "url", ":8003", "remote", "192.0.2.2", "tail", "url", ":7003")
    assert len(h2.list()) == 1
    assert h1.stop() == 0
    assert h2.list() == []


def test_far_daemon_killed_then_local_delete(pair):
    h1, h2 = pair
    h1.create("id", "orphan", "url", ":8004", "remote", "192.0.2.2", "tail", "url", ":7004")
    h2.stop(signal.SIGKILL)
    r = h1.wormhole("delete", "orphan")
    assert r.returncode == 0
    assert "192.0.2.2" in r.stderr and "could not be deleted" in r.stderr and r.stderr.count("\n") == 1
    assert h1.list() == [] and not h1.listening(8004)


def test_wrong_key_peer(pair, make_host):
    h1, _ = pair
    h3 = make_host(key="another-key")
    veth(h1, "198.51.100.1/24", h3, "198.51.100.3/24")
    r = h1.wormhole("create", "url", ":8005", "remote", "198.51.100.3", "tail", "url", ":7005")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "198.51.100.3" in r.stderr and "key" in r.stderr
    assert h1.list() == [] and h3.list() == [] and not h1.listening(8005)
    r = h1.wormhole("ping", "198.51.100.3")
    assert r.returncode == 1 and "198.51.100.3" in r.stderr


def test_unreachable_peer_fails_within_seconds(pair):
    h1, _ = pair
    start = time.monotonic()
    r = h1.wormhole("create", "url", ":8006", "remote", "192.0.2.99", "tail", "url", ":7006")
    elapsed = time.monotonic() - start
    assert r.returncode == 1 and "192.0.2.99" in r.stderr and r.stderr.count("\n") == 1
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert h1.list() == [] and not h1.listening(8006)


def test_peer_refusing_the_child_spec(pair):
    h1, h2 = pair
    r = h1.wormhole("create", "url", ":8007", "remote", "192.0.2.2", "tail", "url", "nosuchns@:7007")
    assert r.returncode == 1 and "192.0.2.2" in r.stderr and "nosuchns" in r.stderr
    assert h1.list() == [] and h2.list() == [] and not h1.listening(8007)


def test_ipv6_peer(pair):
    h1, h2 = pair
    h2.echo_server(7008, host="::1")
    _, url = h1.create("url", ":8008", "remote", "[2001:db8::2]:9999", "tail", "url", "[::1]:7008")
    [far] = h2.list()
    assert far["head"].startswith("tcp://[2001:db8::2]:")
    assert roundtrip(h1, 8008) == b"hello wormhole"
    assert re.fullmatch(r"\d+\.\d+\n", h1.ok("ping", "[2001:db8::2]"))


def test_parent_daemon_crash_and_restart_finds_its_remote_child_again(pair):
    """The restored parent asks h2 for the very same child: h2 keeps the one it has (a child
    asked for with other words would replace it)."""
    h1, h2 = pair
    h2.echo_server(7009)
    h1.create("id", "phoenix", "url", ":8009", "remote", "192.0.2.2", "tail", "url", ":7009")
    [before] = h2.list()
    h1.stop(signal.SIGKILL)  # no teardown: the child on h2 stays
    assert [r["id"].rsplit(".", 1)[0] for r in h2.list()] == ["phoenix.1"]
    h1.start()  # restores phoenix, which asks for its child again
    [after] = h2.list()
    assert (after["id"], after["head"]) == (before["id"], before["head"])
    assert f"{after['id']}: asked for again by its owner, kept" in h2.logs()
    assert roundtrip(h1, 8009) == b"hello wormhole"


def test_remote_child_is_rebuilt_after_the_peer_restarts(pair):
    h1, h2 = pair
    h2.echo_server(7010)
    h1.create("id", "heal", "url", ":8010", "remote", "192.0.2.2", "tail", "url", ":7010")
    assert roundtrip(h1, 8010) == b"hello wormhole"
    assert h2.stop() == 0
    h2.start()
    assert h2.list() == [], "a peer does not keep remote children across restarts"
    assert refused(h1, 8010), "the old child is gone: this connection fails (after the 5 s retry)"
    assert h1.list()[0]["state"] == "armed"
    assert roundtrip(h1, 8010) == b"hello wormhole", "the next one builds the child again"
    assert [r["id"].rsplit(".", 1)[0] for r in h2.list()] == ["heal.1"]
    assert "does not answer; it is rebuilt" in h1.logs()


def test_children_of_two_callers_with_the_same_id_do_not_clash(make_host):
    """The owner is part of a remote child's identity: two daemons' wormholes named alike
    both get their child on the same peer."""
    h1, h2, h3 = (make_host(key="shared-key") for _ in range(3))
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    veth(h3, "198.51.100.3/24", h2, "198.51.100.2/24")
    h2.echo_server(3306)
    h1.create("id", "db", "url", ":3306", "remote", "192.0.2.2")
    h3.create("id", "db", "url", ":3306", "remote", "198.51.100.2")
    far = sorted(r["id"] for r in h2.list())
    assert len(far) == 2 and far[0] != far[1] and all(f.startswith("db.1.") for f in far)
    assert roundtrip(h1, 3306) == roundtrip(h3, 3306) == b"hello wormhole"
    h1.ok("delete", "db")
    assert [r["id"] for r in h2.list()] == [h3.list()[0]["child"].split("@")[0]]
