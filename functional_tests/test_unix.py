"""Unix sockets as heads and tails, crossing to TCP both ways, through a real daemon."""

import os
import signal
import socket
import stat
import time

from harness import recv_all


def unix_echo(ns, path):
    """An echo service on a unix socket (path, or @name: abstract, in ns's network namespace)."""
    return ns.echo_server(0, host=f"unix:{path}")


def unix_connect(path, ns=None, timeout=10):
    if ns is not None:
        with ns.entered():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect("\0" + path[1:] if path.startswith("@") else path)
    return s


def echo_check(sock, size=1 << 20):
    """Send size random bytes, half-close, expect them back: both directions and the EOF."""
    data = os.urandom(size)
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == data


def test_tcp_head_to_unix_tail(host, tmp_path):
    """Exposing a local socket (a database's, Docker's) on a TCP port."""
    path = str(tmp_path / "service.sock")
    unix_echo(host, path)
    ident, url = host.create("id", "t2u", "url", ":8100", "tail", "url", f"unix://{path}")
    assert url == "tcp://127.0.0.1:8100"
    echo_check(host.connect(8100))
    [row] = host.list()
    assert row["tail"] == f"unix://{path}" and row["state"] == "active"
    assert row["total"] == 1 and row["bytes_in"] == row["bytes_out"] == 1 << 20
    assert f"unix://{path}" in host.ok("list")


def test_unix_head_to_tcp_tail_with_safe_permissions_removed_on_delete(host, tmp_path):
    host.echo_server(7101)
    path = str(tmp_path / "head.sock")
    ident, url = host.create("url", f"unix://{path}", "tail", "url", ":7101")
    assert url == f"unix://{path}"
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and (st.st_uid, st.st_gid) == (0, 0)
    echo_check(unix_connect(path))
    [row] = host.list()
    assert row["head"] == url and row["bytes_in"] == row["bytes_out"] == 1 << 20
    host.ok("delete", ident)
    assert not os.path.exists(path), "the socket file goes with the wormhole"


def test_mode_word_stale_socket_regular_file_and_live_socket(host, tmp_path):
    host.echo_server(7102)
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays: what a crash leaves
    ident, _ = host.create("url", f"unix://{stale}", "mode", "0600", "tail", "url", ":7102")
    assert stat.S_IMODE(os.lstat(stale).st_mode) == 0o600
    echo_check(unix_connect(stale), 1000)
    host.ok("delete", ident)

    regular = tmp_path / "regular"
    regular.write_text("precious")
    r = host.wormhole("create", "url", f"unix://{regular}", "tail", "url", ":7102")
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr and len(r.stderr.splitlines()) == 1
    assert regular.read_text() == "precious"

    live = str(tmp_path / "live.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(live)
    server.listen(5)
    try:
        r = host.wormhole("create", "url", f"unix://{live}", "tail", "url", ":7102")
        assert r.returncode == 1 and "another process serves it" in r.stderr
        assert os.path.exists(live)
    finally:
        server.close()
    assert host.list() == []

    r = host.wormhole("create", "url", ":8102", "mode", "0600", "tail", "url", ":7102")
    assert r.returncode == 2 and "'mode' sets a unix head socket file's permissions" in r.stderr


def test_a_socket_file_left_by_a_crash_is_replaced_at_start_and_removed_at_stop(host, tmp_path):
    host.echo_server(7103)
    path = str(tmp_path / "crash.sock")
    host.create("id", "u", "url", f"unix://{path}", "tail", "url", ":7103")
    host.stop(signal.SIGKILL)
    assert os.path.exists(path), "a crash leaves the file"
    try:
        unix_connect(path)
        raise AssertionError("nobody should accept on the stale file")
    except ConnectionRefusedError:
        pass
    host.start()
    echo_check(unix_connect(path), 1000)  # a new socket replaced the stale one
    assert host.stop() == 0
    assert not os.path.exists(path), "a clean stop removes it"


def test_abstract_and_path_sockets_in_a_named_netns(host, make_ns, tmp_path):
    ns = make_ns()
    unix_echo(ns, "@wh-echo")
    # A unix tail with an abstract name, in the named netns: the name is that namespace's.
    _, url = host.create("url", ":8104", "tail", "url", f"unix:{ns.name}@@wh-echo")
    echo_check(host.connect(8104))
    # A unix head with an abstract name in the named netns, to a tcp tail in the daemon's.
    host.echo_server(7104)
    _, url = host.create("url", f"unix:{ns.name}@@wh-head", "tail", "url", ":7104")
    assert url == f"unix:{ns.name}@@wh-head"
    echo_check(unix_connect("@wh-head", ns=ns))
    # Unix to unix.
    path = str(tmp_path / "u2u.sock")
    host.create("url", f"unix://{path}", "tail", "url", f"unix:{ns.name}@@wh-echo")
    echo_check(unix_connect(path), 100_000)


def test_unix_tail_that_is_not_there_yet_is_retried(host, tmp_path):
    path = str(tmp_path / "late.sock")
    host.create("url", ":8105", "tail", "url", f"unix://{path}")
    c = host.connect(8105)
    time.sleep(0.3)  # the first dial fails; the daemon retries for up to 5 s
    unix_echo(host, path)
    echo_check(c, 1000)
