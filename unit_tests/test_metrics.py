"""Metrics (wormholed/metrics.py): names, types and labels built from a snapshot of plain values,
the trigger histogram's buckets, --metrics addresses, and the exporter over HTTP on a loop."""

import asyncio
import re
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from wormholed.metrics import TRIGGER_BUCKETS, Counters, Exporter, families, parse_addr
from wormholed.state import StateDir
from wormholed.wormholes import Wormholes

TCP = {"id": "web", "peer": None, "transport": None, "proto": "tcp", "trigger": False, "connections": 2,
       "total": 5, "bytes_in": 1 << 20, "bytes_out": 1 << 19, "refused": 1, "dial_failures": 3,
       "trigger_ok": 0, "trigger_failed": 0, "trigger_buckets": [0] * (len(TRIGGER_BUCKETS) + 1),
       "trigger_sum": 0.0}


def _triggered():
    c = Counters()
    c.observe_trigger(0.004, ok=True)  # le 0.005
    c.observe_trigger(0.1, ok=True)  # exactly a bound: le 0.1
    c.observe_trigger(100.0, ok=False)  # beyond the last bound: +Inf only
    return {**TCP, "id": "db", "peer": "myserver", "transport": "tunnel", "trigger": True, "total": 1,
            "trigger_ok": c.trigger_ok, "trigger_failed": c.trigger_failed,
            "trigger_buckets": c.trigger_buckets, "trigger_sum": c.trigger_sum}


SNAPSHOT = {
    "time": 1000.0,
    "wormholes": [
        TCP, _triggered(),
        {**TCP, "id": "dns", "proto": "udp", "connections": 1, "total": 4, "refused": 7, "bytes_in": 64,
         "bytes_out": 128, "dial_failures": 0},
    ],
    "tunnels": [
        {"peer": "myserver", "type": "wireguard", "interface": "wh-1234", "state": "up", "rx_bytes": 10,
         "tx_bytes": 20, "latest_handshake": 990.5},
        {"peer": "other", "type": "ipsec", "interface": "", "state": "down", "rx_bytes": 0, "tx_bytes": 0,
         "latest_handshake": None},
    ],
    "requests": [{"method": "create", "outcome": "ok", "count": 3},
                 {"method": "create", "outcome": "refused", "count": 1},
                 {"method": "(unknown)", "outcome": "invalid", "count": 2}],
    "restored": 2, "restore_failed": 1, "failed_records": 1,
}


class _Fixed:
    def __init__(self, snap):
        self.snap = snap

    def collect(self):
        return families(self.snap)


def exposition(snap=SNAPSHOT) -> str:
    registry = CollectorRegistry()
    registry.register(_Fixed(snap))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a text exposition, read back by prometheus_client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found, name, **labels):
    return found[name, frozenset(labels.items())]


def test_names_types_and_units():
    text = exposition()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert all(name.startswith("wormhole_") for name in types)
    for name, kind in types.items():
        assert re.fullmatch(r"[a-z_]+", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if "bytes" in name:
            assert name.endswith("_bytes_total"), name
    assert types["wormhole_trigger_duration_seconds"] == "histogram"
    assert types["wormhole_tunnel_handshake_age_seconds"] == "gauge"
    assert {n for n, k in types.items() if k == "gauge"} == {
        "wormhole_connections_active", "wormhole_udp_flows_active", "wormhole_tunnel_up",
        "wormhole_tunnel_handshake_age_seconds", "wormhole_failed_records", "wormhole_tail_up",
        "wormhole_tail_connections_active"}
    assert all(re.search(r"^# HELP " + re.escape(n) + r" \S", text, re.MULTILINE) for n in types)


def test_a_load_balanced_wormholes_tails_by_url():
    lb = {**TCP, "id": "lb", "tails": [
        {"url": "tcp://127.0.0.1:81", "state": "up", "connections": 2, "total": 7, "failures": 0},
        {"url": "unix:///run/b.sock", "state": "down", "connections": 0, "total": 3, "failures": 4}]}
    single = {**TCP, "tails": [{"url": "tcp://127.0.0.1:80"}]}  # one tail: no per-tail metrics
    found = samples(exposition({**SNAPSHOT, "wormholes": [lb, single]}))
    a, b = dict(id="lb", tail="tcp://127.0.0.1:81"), dict(id="lb", tail="unix:///run/b.sock")
    assert (value(found, "wormhole_tail_up", **a), value(found, "wormhole_tail_up", **b)) == (1, 0)
    assert value(found, "wormhole_tail_connections_active", **a) == 2
    assert value(found, "wormhole_tail_connections_total", **b) == 3
    assert value(found, "wormhole_tail_failures_total", **b) == 4
    assert not [k for k in found if "tail" in dict(k[1]) and dict(k[1])["id"] == "web"]


def test_wormhole_labels_and_values():
    found = samples(exposition())
    web = dict(id="web", peer="", transport="")
    assert value(found, "wormhole_connections_accepted_total", **web) == 5
    assert value(found, "wormhole_connections_active", **web) == 2
    assert value(found, "wormhole_connections_refused_total", **web) == 1
    assert value(found, "wormhole_client_to_tail_bytes_total", **web) == 1 << 20
    assert value(found, "wormhole_tail_to_client_bytes_total", **web) == 1 << 19
    assert value(found, "wormhole_tail_dial_failures_total", **web) == 3
    db = dict(id="db", peer="myserver", transport="tunnel")
    assert value(found, "wormhole_connections_accepted_total", **db) == 1
    # UDP wormholes have flows, not connections, and the reverse
    dns = dict(id="dns", peer="", transport="")
    assert value(found, "wormhole_udp_flows_total", **dns) == 4
    assert value(found, "wormhole_udp_flows_active", **dns) == 1
    assert value(found, "wormhole_udp_datagrams_refused_total", **dns) == 7
    assert ("wormhole_connections_accepted_total", frozenset(dns.items())) not in found
    assert ("wormhole_udp_flows_total", frozenset(web.items())) not in found
    # every per-wormhole sample has exactly the labels id, peer, transport (+ outcome, le)
    for (name, labels), _ in found.items():
        if name.startswith(("wormhole_connections", "wormhole_udp", "wormhole_tail", "wormhole_client",
                            "wormhole_trigger")):
            assert {k for k, _ in labels} - {"outcome", "le"} == {"id", "peer", "transport"}, name


def test_trigger_runs_and_histogram():
    found = samples(exposition())
    db = dict(id="db", peer="myserver", transport="tunnel")
    assert value(found, "wormhole_trigger_runs_total", outcome="ok", **db) == 2
    assert value(found, "wormhole_trigger_runs_total", outcome="failed", **db) == 1
    h = "wormhole_trigger_duration_seconds"
    assert value(found, h + "_count", **db) == 3
    assert value(found, h + "_sum", **db) == pytest.approx(100.104)
    assert value(found, h + "_bucket", le="0.001" if 0.001 in TRIGGER_BUCKETS else "0.005", **db) == 1
    assert value(found, h + "_bucket", le="0.05", **db) == 1
    assert value(found, h + "_bucket", le="0.1", **db) == 2, "a run of exactly a bound is in its bucket"
    assert value(found, h + "_bucket", le="60.0", **db) == 2
    assert value(found, h + "_bucket", le="+Inf", **db) == 3
    buckets = [v for (n, labels), v in found.items() if n == h + "_bucket" and ("id", "db") in labels]
    assert len(buckets) == len(TRIGGER_BUCKETS) + 1
    # no trigger word and no run: no trigger series for that wormhole
    assert not [k for k in found if k[0].startswith("wormhole_trigger") and ("id", "web") in k[1]]


def test_tunnels_and_daemon():
    found = samples(exposition())
    wg = dict(peer="myserver", type="wireguard", interface="wh-1234")
    ipsec = dict(peer="other", type="ipsec", interface="")
    assert value(found, "wormhole_tunnel_up", **wg) == 1
    assert value(found, "wormhole_tunnel_up", **ipsec) == 0
    assert value(found, "wormhole_tunnel_rx_bytes_total", **wg) == 10
    assert value(found, "wormhole_tunnel_tx_bytes_total", **wg) == 20
    assert value(found, "wormhole_tunnel_handshake_age_seconds", **wg) == 9.5
    assert ("wormhole_tunnel_handshake_age_seconds", frozenset(ipsec.items())) not in found, "no handshake yet"
    assert value(found, "wormhole_control_requests_total", method="create", outcome="ok") == 3
    assert value(found, "wormhole_control_requests_total", method="create", outcome="refused") == 1
    assert value(found, "wormhole_control_requests_total", method="(unknown)", outcome="invalid") == 2
    assert value(found, "wormhole_restore_records_total", outcome="restored") == 2
    assert value(found, "wormhole_restore_records_total", outcome="failed") == 1
    assert value(found, "wormhole_failed_records") == 1


def test_empty_snapshot_and_openmetrics():
    """A daemon with nothing yet still exposes its daemon-level series; the OpenMetrics format
    (what Prometheus asks for first) is valid too and has no _created samples."""
    found = samples(exposition({"time": 1.0}))
    assert value(found, "wormhole_restore_records_total", outcome="restored") == 0
    assert value(found, "wormhole_failed_records") == 0
    registry = CollectorRegistry()
    registry.register(_Fixed(SNAPSHOT))
    om = generate_openmetrics(registry).decode()
    assert om.endswith("# EOF\n") and "_created" not in om
    assert 'wormhole_client_to_tail_bytes_total{id="web",peer="",transport=""} 1.048576e+06' in om


def test_counters_record_a_trigger_run():
    c = Counters()
    c.trigger_started()
    c.trigger_ended(ok=False)
    assert (c.trigger_ok, c.trigger_failed, sum(c.trigger_buckets)) == (0, 1, 1)
    assert c.trigger_buckets[0] == 1 and 0 <= c.trigger_sum < TRIGGER_BUCKETS[0]


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9998", ("127.0.0.1", 9998)), (":9998", (None, 9998)), ("[::1]:9998", ("::1", 9998)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_addr(text, want):
    assert parse_addr(text) == want


@pytest.mark.parametrize("text", ["", "127.0.0.1", "127.0.0.1:", ":0", ":99999", "::1:9998", "a b:1", "[::1"])
def test_parse_addr_refuses(text):
    with pytest.raises(ValueError) as e:
        parse_addr(text)
    assert "\n" not in str(e.value) and str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exporter_serves_a_live_table_over_http(tmp_path):
    """The real shell: the library's HTTP server thread asks the loop for a snapshot of a real
    Wormholes table (one record restored, one not)."""
    state = StateDir(str(tmp_path))
    state.ensure()
    state.save("up", {"id": "up", "words": ["url", f"127.0.0.1:{_free_port()}", "tail", "url", ":7"]})
    state.save("bad", {"id": "bad", "words": ["url", ":1", "tail", "url", "nosuchns0x@:7"]})

    async def main():
        wormholes = Wormholes(state)
        await wormholes.restore()
        exporter = Exporter(wormholes, None, None)
        exporter.start("127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{exporter.port}/metrics"
            with await asyncio.to_thread(urllib.request.urlopen, url, timeout=10) as r:
                return r.headers["Content-Type"], r.read().decode()
        finally:
            await exporter.aclose()
            await wormholes.aclose()

    ctype, text = asyncio.run(main())
    assert ctype.startswith("text/plain; version=0.0.4")
    found = samples(text)
    assert value(found, "wormhole_restore_records_total", outcome="restored") == 1
    assert value(found, "wormhole_restore_records_total", outcome="failed") == 1
    assert value(found, "wormhole_failed_records") == 1
    assert value(found, "wormhole_connections_accepted_total", id="up", peer="", transport="") == 0
    assert any(name.startswith("process_") for name, _ in found), "the daemon's process metrics"
