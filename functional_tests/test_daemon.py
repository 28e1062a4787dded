"""wormholed as a process: start/stop, the authenticated control channel, bad input, systemd."""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path


from harness import WORMHOLE, WORMHOLED, s_client


def test_start_stop_over_tcp_and_unix(host):
    assert re.fullmatch(r"\d+\.\d+\n", host.ok("ping"))  # unix socket
    r = host.wormhole("ping", host="tcp://127.0.0.1:9999")
    assert r.returncode == 0 and re.fullmatch(r"\d+\.\d+\n", r.stdout)
    assert host.wormhole("ping", host=":9999").returncode == 0
    sock_path = host.sock[len("unix://"):]
    assert Path(sock_path).exists()
    assert host.stop() == 0
    assert not Path(sock_path).exists(), "the unix socket is removed on exit"
    r = host.wormhole("ping")
    assert r.returncode == 1 and "cannot reach wormholed" in r.stderr and r.stderr.count("\n") == 1


def test_sigint_also_stops_cleanly(host):
    assert host.stop(signal.SIGINT) == 0


def test_wrong_key_refused(host):
    other = host.dir / "other.key"
    other.write_text("not-the-key")
    os.chmod(other, 0o600)
    r = host.exec(WORMHOLE, "-H", host.sock, "-K", str(other), "ping")
    assert r.returncode == 1
    assert "handshake failed" in r.stderr and "key" in r.stderr and r.stderr.count("\n") == 1
    assert host.wormhole("ping").returncode == 0, "the daemon survives"


def test_key_file_checks(make_host):
    h = make_host(start=False)
    h.write_key("k", mode=0o644)
    h.start(wait=False)
    assert h.daemon.wait(10) == 1
    assert "readable" in h.logs() or "accessible by group or others" in h.logs()
    assert h.wormhole("ping").returncode == 1
    assert "accessible by group or others" in h.wormhole("ping").stderr
    (h.etc / "key.secret").unlink()
    r = h.exec(WORMHOLED, "--state-dir", str(h.state))
    assert r.returncode == 1 and "not found" in r.stderr and "keygen" in r.stderr


def test_usage_errors_exit_2(host):
    r = host.exec(WORMHOLED, "-P", "9-1")
    assert r.returncode == 2 and "port range" in r.stderr
    r = host.exec(WORMHOLED, "-H", "http://x")
    assert r.returncode == 2 and "tcp:// or unix://" in r.stderr
    r = host.wormhole("nosuchcommand")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_cli_refuses_a_server_presenting_a_certificate(host, tmp_path):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", tmp_path / "k.pem",
                    "-out", tmp_path / "c.pem", "-subj", "/CN=imposter", "-days", "1"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    with host.entered():
        srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    seen = []

    def serve():
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.recv(100))
        except (ssl.SSLError, OSError) as e:
            seen.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = host.wormhole("ping", host=f"127.0.0.1:{port}")
    t.join(10)
    srv.close()
    assert r.returncode == 1 and "certificate" in r.stderr
    assert not any(isinstance(x, bytes) and x for x in seen), "no request was sent to the imposter"


def test_openssl_s_client_speaks_json_rpc(host):
    [line] = s_client(host, host.key, ['{"jsonrpc":"2.0","id":1,"method":"echo","params":{"hello":"world"}}'], 1)
    reply = json.loads(line)
    assert reply == {"jsonrpc": "2.0", "id": 1, "result": {"hello": "world"}}


def test_garbage_on_the_socket(host):
    """Plain garbage, a broken TLS handshake, bad JSON, an oversize line: the daemon answers and lives."""
    with host.entered():
        raw = socket.create_connection(("127.0.0.1", 9999))
    raw.sendall(os.urandom(4096))
    raw.settimeout(5)
    try:
        raw.recv(100)
    except OSError:
        pass
    raw.close()

    big = "x" * ((1 << 20) + 10)
    lines = ["{not json", '{"jsonrpc":"2.0","id":2,"method":"frobnicate"}', f'"{big}"', "[]",
             '{"jsonrpc":"2.0","id":3,"method":"echo","params":{"still":"alive"}}']
    replies = [json.loads(line) for line in s_client(host, host.key, lines, len(lines))]
    codes = [x.get("error", {}).get("code") for x in replies]
    assert codes == [-32700, -32601, -32600, -32600, None], replies
    assert replies[-1]["result"] == {"still": "alive"}
    assert host.wormhole("ping").returncode == 0


def test_socket_activation_with_systemd_socket_activate(make_host):
    h = make_host(start=False)
    path = h.dir / "activated.sock"
    argv = ["systemd-socket-activate", "-l", str(path), WORMHOLED, "--state-dir", str(h.state)]
    h.daemon = h.popen(*argv, stdout=subprocess.DEVNULL, stderr=open(h.log, "ab"))
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    r = h.first_ping(f"unix://{path}")
    assert r.returncode == 0, r.stderr + h.logs()
    while "socket(s) from systemd" not in h.logs() and time.monotonic() < deadline + 10:
        time.sleep(0.05)  # the control socket answers before the start-up is logged
    assert "socket(s) from systemd" in h.logs()
    assert h.stop() == 0


def test_notify_socket_gets_ready_and_stopping(make_host, tmp_path):
    h = make_host(start=False)
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    env = dict(os.environ, NOTIFY_SOCKET=path)
    h.start(env=env, wait=False)
    assert sock.recv(100) == b"READY=1"
    assert h.wormhole("ping").returncode == 0
    h.daemon.send_signal(signal.SIGTERM)
    assert sock.recv(100) == b"STOPPING=1"
    assert h.daemon.wait(10) == 0
    sock.close()
