"""`wormholed --metrics ADDR`: a real Prometheus server (Debian's prometheus package) scrapes a test
host's daemon every second, and the figures are read back through Prometheus's own HTTP query API
after traffic of a known size; a plain GET of /metrics; bad and busy addresses."""

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import SLOW, WORMHOLED, recv_all, veth

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
METRICS = "127.0.0.1:9998"
PROM_PORT = 9090  # in the test host's own namespace: free
MiB = 1 << 20

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: wormholed
    static_configs:
      - targets: ["{target}"]
"""


def get(host, url: str, timeout: float = 5):
    """An HTTP GET made from inside the host's namespace: (status, headers, body)."""
    with host.entered():
        req = urllib.request.urlopen(url, timeout=timeout)  # the socket is made here, in the netns
    with req as r:
        return r.status, r.headers, r.read()


@contextlib.contextmanager
def prometheus(host, target: str):
    """Prometheus in the host's namespace, scraping target every second; killed, and its
    config and TSDB removed, when the block ends (also on failure). A missing prometheus
    fails (as a missing Docker engine or containerd does), it does not skip."""
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"no {PROMETHEUS} (the metrics tests need Debian's prometheus: "
                    f"scripts/install-deps installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="wh-prometheus-"))
    proc = None
    try:
        (tmp / "prometheus.yml").write_text(CONFIG.format(target=target))
        log = open(tmp / "prometheus.log", "wb")
        proc = host.popen(PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20 * SLOW
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}:\n{(tmp / 'prometheus.log').read_text()}")
            try:
                if get(host, f"http://127.0.0.1:{PROM_PORT}/-/ready", 1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready:\n{(tmp / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield tmp
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def query(host, expr: str) -> dict[tuple, float]:
    """An instant query through Prometheus's HTTP API: {(metric name, labels...): value}, without
    the job and instance labels Prometheus adds."""
    url = f"http://127.0.0.1:{PROM_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    _, _, body = get(host, url)
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    out = {}
    for r in doc["data"]["result"]:
        labels = {k: v for k, v in r["metric"].items() if k not in ("job", "instance")}
        name = labels.pop("__name__", "")
        out[(name, *sorted(labels.items()))] = float(r["value"][1])
    return out


def key(name: str, **labels) -> tuple:
    """A query() key; an empty label is no label to Prometheus."""
    return (name, *sorted((k, v) for k, v in labels.items() if v))


@contextlib.contextmanager
def half_server(host, port: int):
    """A TCP server in the host: reads each connection to its end, then sends back half as many
    bytes and closes."""
    with host.entered():
        srv = socket.create_server(("127.0.0.1", port))

    def serve(conn):
        with conn:
            n = len(recv_all(conn))
            conn.sendall(b"x" * (n // 2))

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield
    finally:
        srv.close()


def turned_away(host, port: int) -> bool:
    """The proxy closed or reset a new connection to port without relaying anything (the reset
    may come before connect() returns)."""
    try:
        s = host.connect(port)
    except ConnectionResetError:
        return True
    with s:
        try:
            s.sendall(b"?")
            return s.recv(10) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_prometheus_scrapes_the_daemon(make_host):
    """Traffic of a known size, trigger runs, a refusal, a failed tail dial, UDP flows and control
    requests, then the figures as Prometheus itself reports them."""
    h = make_host(args=("--metrics", METRICS))
    h.echo_server(7001)
    h.echo_server(7005, udp=True)
    with prometheus(h, METRICS), half_server(h, 7000):
        w = dict(peer="", transport="")
        h.create("id", "m", "url", ":8000", "tail", "url", ":7000")
        for _ in range(5):  # 1 MiB one way, 512 KiB back, 5 connections
            with h.connect(8000) as s:
                s.sendall(b"y" * MiB)
                s.shutdown(socket.SHUT_WR)
                assert len(recv_all(s)) == MiB // 2
        h.create("id", "t", "url", ":8001", "trigger", "url", ":7001")
        with h.connect(8001) as s:
            s.sendall(b"hi")
            assert s.recv(10) == b"hi"
        h.create("id", "f", "url", ":8005", "trigger", "url", "nosuchns0x@:7001")
        assert turned_away(h, 8005), "the trigger failed: the connection is closed"
        h.create("id", "r", "url", ":8002", "max-conns", "1", "tail", "url", ":7001")
        with h.connect(8002) as held:
            held.sendall(b"hi")
            assert held.recv(10) == b"hi"
            assert turned_away(h, 8002), "over max-conns"
        h.create("id", "d", "url", ":8003", "tail", "url", "192.0.2.1:7999")  # no route from this host
        assert turned_away(h, 8003), "the tail cannot be reached"
        h.create("id", "u", "url", "udp://:8004", "tail", "url", ":7005")
        for msg in (b"one", b"two"):
            with h.connect(8004, udp=True) as s:
                s.sendall(msg)
                assert s.recv(10) == msg
        assert h.wormhole("create", "id", "m", "url", ":8100", "tail", "url", ":7000").returncode == 1
        assert h.wormhole("delete", "nosuch").returncode == 1

        want = {
            key("wormhole_connections_accepted_total", id="m", **w): 5,
            key("wormhole_connections_active", id="m", **w): 0,
            key("wormhole_client_to_tail_bytes_total", id="m", **w): 5 * MiB,
            key("wormhole_tail_to_client_bytes_total", id="m", **w): 5 * MiB // 2,
            key("wormhole_trigger_runs_total", id="t", outcome="ok", **w): 1,
            key("wormhole_trigger_runs_total", id="t", outcome="failed", **w): 0,
            key("wormhole_trigger_duration_seconds_count", id="t", **w): 1,
            key("wormhole_trigger_duration_seconds_bucket", id="t", le="+Inf", **w): 1,
            key("wormhole_trigger_runs_total", id="f", outcome="failed", **w): 1,
            key("wormhole_connections_refused_total", id="r", **w): 1,
            key("wormhole_connections_accepted_total", id="r", **w): 1,
            key("wormhole_tail_dial_failures_total", id="d", **w): 1,
            key("wormhole_tail_dial_failures_total", id="m", **w): 0,
            key("wormhole_udp_flows_total", id="u", **w): 2,
            key("wormhole_client_to_tail_bytes_total", id="u", **w): 6,
            key("wormhole_control_requests_total", method="create", outcome="ok"): 6,
            key("wormhole_control_requests_total", method="create", outcome="refused"): 1,
            key("wormhole_control_requests_total", method="delete", outcome="refused"): 1,
            key("wormhole_restore_records_total", outcome="restored"): 0,
            key("up"): 1,
        }
        deadline = time.monotonic() + 15 * SLOW
        while True:
            got = query(h, '{__name__=~"wormhole_.+|up"}')
            diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
            if not diff:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus reports (got, wanted): {diff}")
            time.sleep(0.5)
        # PromQL over the scraped series: what a dashboard would ask
        total = query(h, 'sum by (id) (wormhole_client_to_tail_bytes_total{id=~"m|u"})')
        assert total == {key("", id="m"): 5 * MiB, key("", id="u"): 6}


def test_plain_get_restore_counts_and_errors(make_host):
    """GET /metrics by hand: the content type and names; records restored and failed at start;
    a bad --metrics is a usage error, a busy port a one-line error at start."""
    h = make_host(args=("--metrics", METRICS))
    h.echo_server(7010)
    h.create("id", "keep", "url", ":8010", "tail", "url", ":7010")
    h.create("id", "lost", "url", ":8011", "tail", "url", ":7010")
    status, headers, body = get(h, f"http://{METRICS}/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    for name in ("wormhole_connections_accepted_total", "wormhole_control_requests_total",
                 "wormhole_restore_records_total", "process_open_fds"):
        assert f"# TYPE {name.removesuffix('_total')} counter" in text or f"# TYPE {name} " in text, name
    assert 'wormhole_connections_accepted_total{id="keep",peer="",transport=""} 0.0' in text

    assert h.stop() == 0
    with h.entered():  # lost's port is taken: it cannot be restored
        blocker = socket.create_server(("127.0.0.1", 8011))
    try:
        h.start("--metrics", METRICS)
        text = get(h, f"http://{METRICS}/metrics")[2].decode()
        assert 'wormhole_restore_records_total{outcome="restored"} 1.0' in text
        assert 'wormhole_restore_records_total{outcome="failed"} 1.0' in text
        assert "wormhole_failed_records 1.0" in text

        r = h.exec(WORMHOLED, "--metrics", "nonsense", "--state-dir", str(h.dir / "other"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--metrics" in r.stderr, r.stderr
        r = h.exec(WORMHOLED, "-H", f"unix://{h.dir}/other.sock", "--metrics", METRICS,
                   "--state-dir", str(h.dir / "other"), timeout=30)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.splitlines()[-1] == (f"wormholed: error: cannot serve metrics on {METRICS}: "
                                             f"Address already in use"), r.stderr
    finally:
        blocker.close()


def test_tunnel_and_tunnelled_wormhole(make_host):
    """A tunnelled wormhole carries its peer and transport; the tunnel's bytes and handshake."""
    h1, h2 = make_host(key="k", args=("--metrics", METRICS)), make_host(key="k")
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    h2.echo_server(7020)
    h1.create("id", "tw", "url", ":8020", "tunnel", "192.0.2.2", "tail", "url", ":7020")
    with h1.connect(8020) as s:
        s.sendall(b"z" * 1000)
        s.shutdown(socket.SHUT_WR)
        assert len(recv_all(s)) == 1000
    text = get(h1, f"http://{METRICS}/metrics")[2].decode()
    found = {(s.name, frozenset(s.labels.items())): s.value
             for fam in text_string_to_metric_families(text) for s in fam.samples}
    tw = frozenset(dict(id="tw", peer="192.0.2.2", transport="tunnel").items())
    assert found["wormhole_client_to_tail_bytes_total", tw] == 1000
    assert found["wormhole_tail_to_client_bytes_total", tw] == 1000
    [(labels, up)] = [(dict(k[1]), v) for k, v in found.items() if k[0] == "wormhole_tunnel_up"]
    assert up == 1 and labels["peer"] == "192.0.2.2" and labels["type"] == "wireguard"
    assert labels["interface"].startswith("wh-")
    tunnel = frozenset(labels.items())
    assert found["wormhole_tunnel_rx_bytes_total", tunnel] > 1000
    assert found["wormhole_tunnel_tx_bytes_total", tunnel] > 1000
    assert 0 <= found["wormhole_tunnel_handshake_age_seconds", tunnel] < 60
