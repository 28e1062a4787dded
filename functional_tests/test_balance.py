"""Load balancing: one head, several tails (`add-tail`), through a real daemon."""

import os
import socket

import pytest

from harness import recv_all, veth, wait_for
from test_wormholes import roundtrip


def tails_of(host, ident):
    [row] = [r for r in host.list() if r["id"] == ident]
    return row["tails"]


def test_round_robin_over_three_tails_one_killed_and_revived(host):
    servers = [host.echo_server(port) for port in (7201, 7202, 7203)]
    host.create("id", "lb", "url", ":8200", "tail", "url", ":7201", "add-tail", "url", ":7202",
                "add-tail", "url", ":7203")
    for _ in range(30):
        assert roundtrip(host, 8200) == b"hello wormhole"
    tails = tails_of(host, "lb")
    assert [t["url"] for t in tails] == [f"tcp://127.0.0.1:{p}" for p in (7201, 7202, 7203)]
    assert [t["total"] for t in tails] == [10, 10, 10], tails
    assert {t["state"] for t in tails} == {"up"}
    assert "7202" in host.ok("list")

    servers[1].kill()  # the second tail dies
    servers[1].wait()
    for _ in range(30):  # no client connection fails: a refused tail is skipped at once
        assert roundtrip(host, 8200) == b"hello wormhole"
    tails = tails_of(host, "lb")
    assert tails[1]["state"] == "down" and tails[1]["failures"] >= 1
    assert tails[1]["total"] == 10 and tails[0]["total"] + tails[2]["total"] == 50
    assert "down" in host.ok("list")

    host.echo_server(7202)  # revived: a probe finds it (backoff 1 s, 2 s, ...)
    wait_for(lambda: tails_of(host, "lb")[1]["state"] == "up", what="the revived tail to be up")
    before = tails_of(host, "lb")[1]["total"]
    for _ in range(9):
        assert roundtrip(host, 8200) == b"hello wormhole"
    assert tails_of(host, "lb")[1]["total"] == before + 3
    assert "is up again" in host.logs() and "is down" in host.logs()


def test_least_conns_sends_new_connections_to_the_least_busy_tail(host):
    for port in (7211, 7212, 7213):
        host.echo_server(port)
    host.create("id", "lc", "url", ":8210", "tail", "url", ":7211", "add-tail", "url", ":7212",
                "add-tail", "url", ":7213", "balance", "least-conns")
    held = []
    try:
        for _ in range(3):
            s = host.connect(8210)
            s.sendall(b"x")
            assert s.recv(1) == b"x"  # relayed: the tail's connection is open
            held.append(s)
        assert [t["connections"] for t in tails_of(host, "lc")] == [1, 1, 1]
        held.pop(1).close()  # the second tail is now the least busy
        wait_for(lambda: [t["connections"] for t in tails_of(host, "lc")] == [1, 0, 1], what="the close")
        s = host.connect(8210)
        s.sendall(b"y")
        assert s.recv(1) == b"y"
        held.append(s)
        assert [t["connections"] for t in tails_of(host, "lc")] == [1, 1, 1]
    finally:
        for s in held:
            s.close()


def test_netns_docker_free_tails_and_a_remote_tail(make_host, make_ns):
    """A tail in the daemon's namespace, one in a named netns and one on another daemon."""
    h1 = make_host(key="lb-key")
    h2 = make_host(key="lb-key")
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    ns = make_ns()
    h1.echo_server(7221)
    ns.echo_server(7222)
    h2.echo_server(7223)
    h1.create("id", "mix", "url", ":8220", "tail", "url", ":7221", "add-tail", "url", f"{ns.name}@:7222",
              "add-tail", "remote", "192.0.2.2", "tail", "url", ":7223")
    data = os.urandom(100_000)
    for _ in range(6):
        with h1.connect(8220) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == data
    tails = tails_of(h1, "mix")  # the remote child is the first tail: the one its link reaches
    assert [t["total"] for t in tails] == [2, 2, 2], tails
    assert tails[0]["url"].startswith("tcp://192.0.2.2:") and tails[1]["url"] == "tcp://127.0.0.1:7221"
    assert tails[2]["url"] == f"tcp://{ns.name}@127.0.0.1:7222"
    [far] = h2.list()
    assert far["total"] == 2 and far["tail"] == "tcp://127.0.0.1:7223"


def test_unix_and_udp_tails_share_too(host, tmp_path):
    path = str(tmp_path / "lb.sock")
    host.echo_server(7231)
    host.echo_server(0, host=f"unix:{path}")
    host.create("id", "ux", "url", ":8230", "tail", "url", ":7231", "add-tail", "url", f"unix://{path}")
    for _ in range(4):
        assert roundtrip(host, 8230) == b"hello wormhole"
    assert [t["total"] for t in tails_of(host, "ux")] == [2, 2]

    host.echo_server(7232, udp=True)
    host.echo_server(7233, udp=True)
    host.create("id", "ud", "url", "udp://:8231", "tail", "url", ":7232", "add-tail", "url", ":7233")
    for i in range(4):  # four client addresses: four flows
        with host.connect(8231, udp=True) as s:
            s.sendall(b"dgram %d" % i)
            assert s.recv(100) == b"dgram %d" % i
    assert [t["total"] for t in tails_of(host, "ud")] == [2, 2]


@pytest.mark.parametrize("words,msg", [
    (["url", ":8240", "tail", "url", ":1", "add-tail", "url", "udp://:2"], "speaks tcp but its tail speaks udp"),
    (["url", ":8240", "balance", "random", "tail", "url", ":1"], "bad balance 'random'"),
    (["url", ":8240", "tail", "url", ":1", "add-tail", "url", ":8240"], "proxies to itself"),
])
def test_bad_balancing_words_are_refused(host, words, msg):
    r = host.wormhole("create", *words)
    assert r.returncode == 2 and msg in r.stderr
    assert host.list() == []
