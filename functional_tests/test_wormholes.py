"""Local wormholes end to end: bytes through real daemons in test hosts."""

import errno
import os
import socket
import time

import pytest

from harness import SLOW, Namespace, recv_all


def roundtrip(ns, port, data=b"hello wormhole", **kw):
    with ns.connect(port, **kw) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def refused(ns, port):
    """The wormhole closed (or reset) the connection without a reply. Its reset can land at any
    step: before the send (EPIPE), before the shutdown (ENOTCONN: the socket is closed already),
    or at the read (ECONNRESET). It may come only after the daemon's 5 s dial retry or a dial's
    timeout, so the read waits well past those."""
    try:
        return roundtrip(ns, port, timeout=30 * SLOW) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return True
        raise


def port_of(url):
    return int(url.rsplit(":", 1)[1])


def test_the_daemon_relays_with_the_engine_asked_for(host):
    """make test runs these tests twice: native engine (the default), then WORMHOLE_ENGINE=python."""
    asked = os.environ.get("WORMHOLE_ENGINE", "native")
    assert f"TCP engine: {asked}" in host.logs()


def test_create_list_delete(host):
    host.echo_server(7000)
    ident, url = host.create("id", "web", "url", ":8000", "tail", "url", ":7000")
    assert (ident, url) == ("web", "tcp://127.0.0.1:8000")
    assert roundtrip(host, 8000) == b"hello wormhole"
    [row] = host.list()
    assert row["id"] == "web" and row["head"] == url and row["tail"] == "tcp://127.0.0.1:7000"
    assert row["state"] == "active" and row["total"] == 1 and row["bytes_in"] == row["bytes_out"] == 14
    table = host.ok("list")
    assert table.splitlines()[0].split()[:4] == ["ID", "HEAD", "TAIL", "STATE"] and "web" in table
    assert host.ok("delete", "web") == ""
    assert not host.listening(8000), "the listener is gone after delete"
    assert host.list() == []
    r = host.wormhole("delete", "web")
    assert r.returncode == 1 and "no wormhole with id 'web'" in r.stderr


def test_random_id_and_ephemeral_head(host):
    host.echo_server(7001)
    ident, url = host.create("tail", "url", ":7001")
    assert len(ident) == 36 and url.startswith("tcp://127.0.0.1:")
    assert roundtrip(host, port_of(url)) == b"hello wormhole"


def test_one_mebibyte_both_ways_and_half_close(host):
    host.echo_server(7002)
    _, url = host.create("url", ":8002", "tail", "url", ":7002")
    data = os.urandom(1 << 20)
    with host.connect(8002) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # half-close: the reply still flows back
        assert recv_all(s) == data


def test_reset_is_passed_on(host):
    with host.entered():
        srv = socket.create_server(("127.0.0.1", 7003))
    _, url = host.create("url", ":8003", "tail", "url", ":7003")
    c = host.connect(8003)
    conn, _ = srv.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()  # RST
    with pytest.raises(ConnectionResetError):
        c.recv(10)
        c.recv(10)
    c.close()
    srv.close()


def test_tail_dial_retried_while_service_starts(host):
    _, url = host.create("url", ":8004", "tail", "url", ":7004")
    with host.connect(8004) as s:
        s.sendall(b"early bytes")
        time.sleep(0.3)  # the first dial is refused; the daemon retries for up to 5 s
        host.echo_server(7004)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"early bytes"


def test_udp(host):
    host.echo_server(7005, udp=True)
    _, url = host.create("url", "udp://:8005", "tail", "url", ":7005")
    assert url == "udp://127.0.0.1:8005"
    a, b = host.connect(8005, udp=True), host.connect(8005, udp=True)
    for s, msg in ((a, b"from a"), (b, b"from b"), (a, b"again a")):
        s.sendall(msg)
        assert s.recv(100) == msg
    [row] = host.list()
    assert row["connections"] == 2, "one flow per client address"
    a.close(), b.close()


def test_head_and_tail_in_named_namespaces(host, make_ns):
    ns1, ns2 = make_ns(), make_ns()
    host.echo_server(7006)  # in the daemon's own namespace
    ns2.echo_server(7006)
    # head in ns1, tail in ns2
    _, url = host.create("url", f"{ns1.name}@:8006", "tail", "url", f"{ns2.name}@:7006")
    assert url == f"tcp://{ns1.name}@127.0.0.1:8006"
    assert roundtrip(ns1, 8006) == b"hello wormhole"
    assert not host.listening(8006), "the head listens in ns1, not in the daemon's namespace"
    # head in ns1, tail in the daemon's own namespace
    _, url = host.create("url", f"{ns1.name}@:8106", "tail", "url", ":7006")
    assert roundtrip(ns1, 8106, b"to host") == b"to host"


def test_missing_namespace_refused_and_nothing_left(host):
    r = host.wormhole("create", "url", "nosuchns@:8007", "tail", "url", ":7007")
    assert r.returncode == 1 and "nosuchns" in r.stderr and r.stderr.count("\n") == 1
    r = host.wormhole("create", "url", ":8007", "tail", "url", "nosuchns@:7007")
    assert r.returncode == 1 and "nosuchns" in r.stderr
    assert host.list() == [] and not host.listening(8007)


def test_child(host, make_ns):
    """A child listens where its parent's tail points (a copy), here in ns1, and goes on to ns2."""
    ns1, ns2 = make_ns(), make_ns()
    ns2.echo_server(7008)
    ident, url = host.create("id", "par", "url", ":8008", "tail", "url", f"{ns1.name}@",
                             "child", "tail", "url", f"{ns2.name}@:7008")
    rows = {r["id"]: r for r in host.list()}
    assert set(rows) == {"par", "par.1"} and rows["par.1"]["parent"] == "par"
    assert rows["par.1"]["head"] == f"tcp://{ns1.name}@127.0.0.1:8008", "a URL that 'url' reads back"
    assert roundtrip(host, 8008) == b"hello wormhole"
    r = host.wormhole("delete", "par.1")
    assert r.returncode == 1 and "delete 'par'" in r.stderr
    host.ok("delete", "par")
    assert not ns1.listening(8008), "the child is deleted with its parent"


def test_chain(host, make_ns):
    ns1 = make_ns()
    host.echo_server(7009)
    _, url = host.create("id", "ch", "url", f"{ns1.name}@:8009", "chain", "url", ":8109", "tail", "url", ":7009")
    rows = {r["id"]: r for r in host.list()}
    assert rows["ch"]["tail"] == rows["ch.1"]["head"] == "tcp://127.0.0.1:8109"
    assert roundtrip(ns1, 8009) == b"hello wormhole"


def test_trigger_defers_and_retries_after_failure(host, make_ns):
    """The tail's namespace is resolved on the first connection; a failure closes that connection
    and the next one tries again."""
    name = f"late{os.getpid() % 10000}"
    _, url = host.create("id", "trig", "url", ":8010", "trigger", "url", f"{name}@:7010")
    assert host.list()[0]["state"] == "armed"
    assert refused(host, 8010), "the trigger failed: the connection is closed"
    assert host.list()[0]["state"] == "armed"
    assert "trigger failed" in host.logs() and name in host.logs()
    late = Namespace(name)
    try:
        late.echo_server(7010)
        assert roundtrip(host, 8010) == b"hello wormhole"
        assert host.list()[0]["state"] == "active"
    finally:
        host.ok("delete", "trig")
        late.close()


def test_trigger_child_built_on_first_connection(host, make_ns):
    ns1 = make_ns()
    host.echo_server(7011)
    host.create("id", "tc", "url", ":8011", "trigger", "url", f"{ns1.name}@", "child", "tail", "url", ":7011")
    assert [r["id"] for r in host.list()] == ["tc"] and not ns1.listening(8011)
    assert roundtrip(host, 8011) == b"hello wormhole"
    assert [r["id"] for r in host.list()] == ["tc", "tc.1"]


MALFORMED = [  # (words, exit code): 2 = the CLI rejects the words itself, 1 = the daemon refuses
    ("", 2), ("frob", 2), ("url", 2), ("url :99999", 2), ("url :0", 2), ("url sctp://:80", 2),
    ("url :80", 2), ("url 0.0.0.0:80", 2), ("tail", 2), ("url 127.0.0.1", 2), ("id a id b url :80 tail url :81", 2),
    ("url :80 trigger trigger", 2), ("url [::1", 2), ("url udp://:80 tail url tcp://:81", 2),
    ("url :80 tail url :81 remote h", 2), ("url a/b@:80 tail url :81", 2),
    ("url :80 tail url nosuch@:81", 1), ("url :80 tail docker-ns mysql", 1),
    ("url :80 remote otherhost", 1), ("url :80 tunnel otherhost", 1),
    ("url 192.0.2.99:80 tail url :81", 1), ("id taken url :8100 tail url :8101", 1),
]


def test_malformed_specs_one_line_error_and_nothing_created(host):
    host.create("id", "taken", "url", ":8012", "tail", "url", ":7012")
    before = host.list()
    assert len(MALFORMED) >= 20
    for words, code in MALFORMED:
        r = host.wormhole("create", *words.split())
        assert r.returncode == code, (words, r.returncode, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("wormhole: "), (words, r.stderr)
        assert "Traceback" not in r.stderr
        assert host.list() == before, words
    assert not host.listening(8100) and not host.listening(80)


def test_records_survive_sigterm_and_are_restored(host):
    host.echo_server(7013)
    host.create("id", "keep", "url", ":8013", "tail", "url", ":7013")
    host.create("id", "gone", "url", ":8014", "tail", "url", ":7013")
    host.ok("delete", "gone")
    with host.connect(8013) as live:
        live.sendall(b"x")
        assert live.recv(1) == b"x"
        assert host.stop() == 0
        try:
            rest = live.recv(10)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", "live connections are closed by the teardown"
    assert not host.listening(8013), "SIGTERM tears down the listeners"
    records = sorted(p.name for p in (host.state / "wormholes").iterdir())
    assert records == ["keep.json"]
    host.start()
    assert [r["id"] for r in host.list()] == ["keep"]
    assert roundtrip(host, 8013) == b"hello wormhole"
    host.ok("delete", "keep")
    assert list((host.state / "wormholes").iterdir()) == []
