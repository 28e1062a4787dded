"""Faults and bad input, each ending in a clear answer with nothing half-done or left behind.

Each test runs real daemons in test hosts (harness.Host); a read-only state dir is
a read-only bind mount made inside the host's own mount namespace, so it goes with
the host whatever happens.
"""

import json
import os
import select
import socket
import subprocess
import time

import pytest

from harness import WORMHOLE, WORMHOLED, s_client, wait_for
from test_wormholes import port_of, roundtrip


def read_only(host, path) -> None:
    for argv in (["mount", "--bind", path, path], ["mount", "-o", "remount,bind,ro", path]):
        r = host.exec(*argv)
        assert r.returncode == 0, r.stderr


def writable(host, path) -> None:
    r = host.exec("umount", path)
    assert r.returncode == 0, r.stderr


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_a_delete_that_cannot_be_recorded_changes_nothing(host):
    host.echo_server(7100)
    ident, url = host.create("url", ":7101", "tail", "url", ":7100")
    read_only(host, host.state)
    r = host.wormhole("delete", ident)
    assert r.returncode == 1
    assert "not deleted" in one_line(r) and "Read-only file system" in r.stderr
    assert [w["id"] for w in host.list()] == [ident], "still listed"
    assert roundtrip(host, port_of(url)) == b"hello wormhole", "and still relaying"
    r = host.wormhole("create", "url", ":7102", "tail", "url", ":7100")
    assert r.returncode == 1 and "not created" in one_line(r) and "Read-only" in r.stderr
    assert not host.listening(7102), "a refused create leaves nothing listening"
    writable(host, host.state)
    host.ok("delete", ident)
    assert host.list() == [] and not host.listening(7101)
    host.stop()
    host.start()
    assert host.list() == [], "deleted for good"


def test_a_record_that_cannot_be_restored_is_listed_deletable_and_retried(host):
    host.echo_server(7110)
    ident, url = host.create("id", "kept", "url", ":7111", "tail", "url", ":7110")
    doomed, _ = host.create("id", "doomed", "url", ":7112", "tail", "url", ":7110")
    host.stop()
    with host.entered():  # someone else takes the ports while the daemon is down
        squatters = [socket.create_server(("127.0.0.1", port)) for port in (7111, 7112)]
    try:
        host.start()
        rows = {w["id"]: w for w in host.list()}
        assert {i: w["state"] for i, w in rows.items()} == {"kept": "failed", "doomed": "failed"}
        assert "Address already in use" in rows["kept"]["reason"]
        assert "could not restore wormhole kept" in host.logs()
        table = host.ok("list")
        assert "failed" in table and "Address already in use" in table
        r = host.wormhole("create", "id", "kept", "url", ":7119", "tail", "url", ":7110")
        assert r.returncode == 1 and "already exists" in r.stderr, "its id stays taken"
        host.ok("delete", doomed)
        assert [w["id"] for w in host.list()] == ["kept"]
    finally:
        for s in squatters:
            s.close()
    host.stop()
    host.start()  # the port is free again: the kept record is tried again and restored
    rows = {w["id"]: w for w in host.list()}
    assert list(rows) == ["kept"] and rows["kept"]["state"] != "failed"
    assert roundtrip(host, port_of(url)) == b"hello wormhole"


@pytest.mark.parametrize("content", ["null", "[]", '{"id": 7, "words": ["url", ":1"]}',
                                     '{"id": "bad", "words": "url :1"}', "[" * 100000])
def test_records_of_the_wrong_shape_are_named_in_the_log_and_skipped(make_host, content):
    h = make_host(start=False)
    (h.state / "wormholes").mkdir(parents=True)
    (h.state / "wormholes" / "bad.json").write_text(content)
    h.start()
    assert "skipping unreadable record" in h.logs() and "bad.json" in h.logs()
    assert "Traceback" not in h.logs()
    assert h.list() == []
    h.echo_server(7120)
    _, url = h.create("url", ":7121", "tail", "url", ":7120")
    assert roundtrip(h, port_of(url)) == b"hello wormhole"


def test_deep_json_and_huge_creates_get_json_rpc_errors(host):
    lines = ["[" * 100000,
             '{"jsonrpc": "2.0", "id": 2, "method": "echo", "params": {"a": ' + "[" * 40 + "]" * 40 + "}}",
             json.dumps({"jsonrpc": "2.0", "id": 3, "method": "create", "params": {"words": ["chain"] * 10000}}),
             json.dumps({"jsonrpc": "2.0", "id": 4, "method": "echo", "params": {"still": "alive"}})]
    replies = [json.loads(line) for line in s_client(host, host.key, lines, len(lines))]
    assert [r.get("error", {}).get("code") for r in replies] == [-32700, -32700, -32602, None], replies
    assert "nested 100000 levels deep" in replies[0]["error"]["message"]
    assert "too many words: 10000 (the limit is 256)" in replies[2]["error"]["message"]
    assert "Traceback" not in host.logs() and host.list() == []
    r = host.wormhole("create", *(["chain"] * 300))
    assert r.returncode == 2 and "too many words: 300" in one_line(r)


def test_a_fifo_as_key_file_is_refused_at_once(make_host):
    h = make_host(start=False)
    fifo = h.dir / "key.fifo"
    os.mkfifo(fifo, 0o600)
    for argv in ([WORMHOLED, "-K", fifo, "--state-dir", h.state], [WORMHOLE, "-K", fifo, "ping"]):
        r = h.exec(*argv, timeout=10)
        assert r.returncode == 1 and "is not a regular file" in one_line(r)


def test_a_read_only_state_dir_with_a_stale_temp_file_starts_and_refuses_changes(host):
    host.echo_server(7130)
    ident, url = host.create("url", ":7131", "tail", "url", ":7130")
    host.stop()
    (host.state / "wormholes" / "cut.json.tmp").write_text("{half")
    read_only(host, host.state)
    host.start()
    assert "is read-only" in host.logs() and "cut.json.tmp" in host.logs()
    assert [w["id"] for w in host.list()] == [ident]
    assert roundtrip(host, port_of(url)) == b"hello wormhole"
    r = host.wormhole("create", "url", ":7132", "tail", "url", ":7130")
    assert r.returncode == 1 and "Read-only file system" in one_line(r)
    assert [w["id"] for w in host.list()] == [ident] and not host.listening(7132)


def test_two_daemons_cannot_share_a_state_dir(host):
    r = host.exec(WORMHOLED, "-H", f"unix://{host.dir}/second.sock", "--state-dir", host.state, timeout=10)
    assert r.returncode == 1
    line = one_line(r)
    assert "state dir" in line and "in use by another wormholed (pid " in line and "--state-dir" in line
    pid = int(line.split("(pid ")[1].split(")")[0])
    assert os.path.exists(f"/proc/{pid}") and "wormholed" in open(f"/proc/{pid}/cmdline").read()
    assert host.wormhole("ping").returncode == 0, "the first one is untouched"
    second = host.popen(WORMHOLED, "-H", f"unix://{host.dir}/second.sock", "-H", "tcp://127.0.0.1:6666",
                        "--state-dir", host.dir / "state2", stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while host.wormhole("ping", host="127.0.0.1:6666").returncode != 0:
            assert second.poll() is None and time.monotonic() < deadline, second.stderr.read()
            time.sleep(0.1)
    finally:
        second.terminate()
        second.wait(15)


def test_relative_unix_socket_paths(make_host):
    h = make_host(start=False)
    daemon = h.popen(WORMHOLED, "-H", "unix://./rel.sock", "--state-dir", h.state, cwd=h.dir,
                     stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not (h.dir / "rel.sock").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, daemon.stderr.read()
            time.sleep(0.1)
        r = h.exec(WORMHOLE, "-H", "unix://./rel.sock", "ping", cwd=h.dir)
        assert r.returncode == 0, r.stderr
        r = h.exec(WORMHOLE, "-H", "unix://rel.sock", "ping", cwd=h.dir)
        assert r.returncode == 0, r.stderr
    finally:
        daemon.terminate()
        daemon.wait(15)
    assert not (h.dir / "rel.sock").exists()


def flows(host) -> int:
    """UDP flows the host's only wormhole opened or refused so far."""
    [row] = host.list()
    return row["connections"] + row["refused"]


def udp_clients(host, n: int):
    """n UDP sockets in the host's namespace, each on its own source port."""
    with host.entered():
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.settimeout(2)
    return socks


def echoed(sock, port: int, data: bytes = b"ping") -> bool:
    sock.sendto(data, ("127.0.0.1", port))
    try:
        return sock.recv(100) == data
    except TimeoutError:
        return False


def test_udp_flows_are_capped_counted_and_logged(host):
    host.echo_server(7140, udp=True)
    ident, url = host.create("url", "udp://:7141", "max-conns", "3", "idle-timeout", "2s", "tail", "url", ":7140")
    [row] = host.list()
    assert (row["max_conns"], row["idle_timeout"]) == (3, 2.0)
    assert "max-conns 3, idle-timeout 2s" in host.ok("list")
    clients = udp_clients(host, 5)
    try:
        for i, s in enumerate(clients):
            s.sendto(b"ping %d" % i, ("127.0.0.1", 7141))
        wait_for(lambda: flows(host) == 5, 30, "5 flows counted")
        [row] = host.list()
        assert (row["connections"], row["refused"]) == (3, 2)
        for i, s in enumerate(clients):
            s.settimeout(10 if i < 3 else 0.2)
            try:
                got = s.recv(100)
            except TimeoutError:
                got = None
            assert got == (b"ping %d" % i if i < 3 else None), i
        assert f"wormhole {ident}: UDP datagrams: 1 dropped: new flows refused, 3 (max-conns) are open" in host.logs()
        time.sleep(2)  # idle-timeout 2s: the three flows are closed...
        wait_for(lambda: host.list()[0]["connections"] == 0, 10, "the idle flows closed")
        clients[4].settimeout(10)
        assert echoed(clients[4], 7141), "...and a new client gets a flow"
    finally:
        for s in clients:
            s.close()


def test_udp_flows_stop_at_the_fd_reserve_and_the_control_channel_still_answers(host):
    """RLIMIT_NOFILE lowered to 200 on the running daemon: flows take fds up to the last 64, no
    further; `wormhole ping` still answers and the log names the cause."""
    host.echo_server(7150, udp=True)
    host.create("url", "udp://:7151", "tail", "url", ":7150")
    r = subprocess.run(["prlimit", "--pid", str(host.daemon.pid), "--nofile=200:200"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clients = udp_clients(host, 250)
    try:
        for sent in range(50, 251, 50):  # in batches the daemon has counted: none lost in a full buffer
            for s in clients[sent - 50:sent]:
                s.sendto(b"ping", ("127.0.0.1", 7151))
            wait_for(lambda: flows(host) == sent, 30, f"{sent} flows opened or refused")
        [row] = host.list()
        waiting, answered, deadline = set(clients), 0, time.monotonic() + 30
        while answered < row["connections"] and time.monotonic() < deadline:
            for s in select.select(list(waiting), [], [], 1)[0]:
                answered += s.recv(100) == b"ping"
                waiting.discard(s)
        assert 20 < answered < 200 - 64
        assert row["connections"] == answered and row["refused"] == 250 - answered
        assert not select.select(list(waiting), [], [], 0.2)[0], "no refused flow was answered"
        assert host.wormhole("ping").returncode == 0
        assert "out of file descriptors (the last 64 are kept for the control channel)" in host.logs()
        fds = len(os.listdir(f"/proc/{host.daemon.pid}/fd"))
        assert fds <= 200 - 64 + 2, fds
    finally:
        for s in clients:
            s.close()


def closed_by_proxy(sock, timeout: float = 5) -> bool:
    """The proxy closed (or reset) this client's connection within timeout seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def test_tcp_max_conns_and_idle_timeout_through_the_daemon(make_host):
    h = make_host(args=("--max-conns", "7"))
    h.echo_server(7160)
    ident, url = h.create("url", ":7161", "max-conns", "2", "idle-timeout", "5s", "tail", "url", ":7160")
    plain, _ = h.create("url", ":7162", "tail", "url", ":7160")
    rows = {r["id"]: r for r in h.list()}
    assert (rows[ident]["max_conns"], rows[ident]["idle_timeout"]) == (2, 5.0)
    assert (rows[plain]["max_conns"], rows[plain]["idle_timeout"]) == (7, None), "the daemon's default"
    first, second = h.connect(7161), h.connect(7161)
    for s in (first, second):
        s.sendall(b"hi")
        assert s.recv(10) == b"hi"
    try:
        third = h.connect(7161)
    except ConnectionResetError:  # the reset came before connect() returned
        pass
    else:
        assert closed_by_proxy(third), "over max-conns: turned away"
        third.close()
    rows = {r["id"]: r for r in h.list()}
    assert (rows[ident]["connections"], rows[ident]["refused"]) == (2, 1)
    # idle-timeout 5s (room for a slow `list` above): both quiet connections are cut, and there is room again
    assert closed_by_proxy(first, 15) and closed_by_proxy(second, 15)
    first.close()
    second.close()
    assert roundtrip(h, 7161) == b"hello wormhole"
    h.stop()
    h.start()
    rows = {r["id"]: r for r in h.list()}
    assert (rows[ident]["max_conns"], rows[ident]["idle_timeout"]) == (2, 5.0), "restored with its words"


@pytest.mark.parametrize("engine", ["native", "python"])
def test_tcp_connections_stop_at_the_fd_reserve_and_the_control_channel_still_answers(make_host, engine):
    """The daemon under RLIMIT_NOFILE 200: 250 held connections through a wormhole; those that
    would take one of the last 64 fds are reset and counted, and `wormhole ping` answers."""
    h = make_host(start=False)
    h.echo_server(7170)
    env = dict(os.environ, WORMHOLE_ENGINE=engine)
    h.daemon = h.popen("prlimit", "--nofile=200:200", WORMHOLED, "-H", h.sock, "--state-dir", h.state,
                       stderr=open(h.log, "ab"), env=env)
    h.wait_ready()
    h.create("url", ":7171", "tail", "url", ":7170")
    clients = []
    try:
        for _ in range(250):
            try:
                clients.append(h.connect(7171))
            except ConnectionResetError:  # the reset came before connect() returned
                pass
        alive = 0
        for s in clients:
            s.settimeout(5)  # a relayed one echoes, a refused one was reset: neither waits long
            try:
                s.sendall(b"x")
                alive += s.recv(10) == b"x"
            except OSError:
                pass
        [row] = h.list()
        # each relayed connection takes 2 fds (native) or up to 6 (python: pipes while splicing)
        assert 5 < alive < 200 - 64 and row["refused"] >= 250 - alive
        assert h.wormhole("ping").returncode == 0
    finally:
        for s in clients:
            s.close()
