"""Prometheus metrics (`wormholed --metrics ADDR`): what the daemon's own objects already count.

Why this shape:

- Nothing is counted for the metrics' sake on the data plane. The proxies
  already keep their counters (`Stats`: connections, bytes, refused; the
  native engine keeps its own and Python reads them on demand), so a scrape
  reads them; it never sits on the path of a packet or a connection. What
  no proxy counted (trigger runs and how long they took, tail dials that
  failed for good) is counted where it happens, in `Counters`, which is a
  few integers per wormhole touched only on those rare events.
- A custom collector reads the live objects at scrape time, into its own
  `CollectorRegistry`: prometheus_client's metric classes would have to be
  told every change as it happens, which is exactly the per-event cost this
  avoids. The exposition format is the library's, not written here.
- The HTTP server is prometheus_client's own (a thread). The daemon's tables
  are the event loop's and change under it (a create, a closing flow), so
  the scrape thread never walks them itself: it asks the loop for a
  snapshot of plain values (`run_coroutine_threadsafe`, with a timeout) and
  builds the families from that.
- `families(snapshot)` is pure, so the names and labels are checked by unit
  tests without a daemon; `Exporter` is the shell around it.
- prometheus_client is imported only when the metrics are served or built:
  a daemon without `--metrics` does not pay its import (about 0.1 s).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING

from wormhole.spec import SpecError, hostport, split_host_port

if TYPE_CHECKING:
    from .api import ControlServer
    from .tunnels.table import Tunnels
    from .wormholes import Wormholes

log = logging.getLogger("wormholed")

# Trigger runs build a tail's namespace, a container, a remote child, a tunnel: milliseconds
# to a minute.
TRIGGER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SNAPSHOT_TIMEOUT = 5.0  # seconds a scrape waits for the event loop
WORMHOLE_LABELS = ("id", "peer", "transport")
TUNNEL_LABELS = ("peer", "type", "interface")


class Counters:
    """What a segment counts beside its proxy's Stats: trigger runs (by outcome, and their
    durations in TRIGGER_BUCKETS) and tail dials that failed for good. Touched on the event
    loop only, and only when a trigger runs or a dial fails."""

    __slots__ = ("dial_failures", "trigger_ok", "trigger_failed", "trigger_buckets", "trigger_sum", "_started")

    def __init__(self) -> None:
        self.dial_failures = 0
        self.trigger_ok = 0
        self.trigger_failed = 0
        self.trigger_buckets = [0] * (len(TRIGGER_BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.trigger_sum = 0.0
        self._started: float | None = None

    def trigger_started(self) -> None:
        self._started = time.monotonic()

    def trigger_ended(self, ok: bool) -> None:
        seconds = time.monotonic() - self._started if self._started is not None else 0.0
        self._started = None
        self.observe_trigger(seconds, ok)

    def observe_trigger(self, seconds: float, ok: bool) -> None:
        if ok:
            self.trigger_ok += 1
        else:
            self.trigger_failed += 1
        self.trigger_buckets[bisect.bisect_left(TRIGGER_BUCKETS, seconds)] += 1  # le: <= the bound
        self.trigger_sum += seconds


def parse_addr(text: str) -> tuple[str | None, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (every address) -> (host or None, port);
    ValueError with a one-line reason otherwise."""
    try:
        host, port = split_host_port(text, "--metrics")
    except SpecError as e:
        raise ValueError(str(e)) from None
    if port is None:
        raise ValueError(f"{text!r} has no port: write HOST:PORT, e.g. 127.0.0.1:9998, or :PORT")
    return host, port


def format_addr(host: str | None, port: int) -> str:
    return hostport(host or "", port)


# --- the pure part: a snapshot of plain values -> metric families ------------------------------

def _counter(name, doc, labels):
    from prometheus_client.core import CounterMetricFamily
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name, doc, labels):
    from prometheus_client.core import GaugeMetricFamily
    return GaugeMetricFamily(name, doc, labels=labels)


def families(snap: dict) -> list:
    """The metric families of a snapshot (see `Exporter.snapshot` for its keys):

        {"time": unix seconds,
         "wormholes": [{"id", "peer", "transport", "proto", "trigger", "connections", "total",
                        "bytes_in", "bytes_out", "refused", "dial_failures", "trigger_ok",
                        "trigger_failed", "trigger_buckets", "trigger_sum",
                        "tails": [{"url", "state", "connections", "total", "failures"}] (several tails)}],
         "tunnels": [{"peer", "type", "interface", "state", "rx_bytes", "tx_bytes",
                      "latest_handshake" (unix seconds or None)}],
         "requests": [{"method", "outcome", "count"}],
         "restored": int, "restore_failed": int, "failed_records": int}

    Every wormhole carries the labels id, peer and transport (peer: the daemon its tail's
    child lives on, transport: direct, tunnel or udptunnel; both empty for a wormhole that
    stays on this host); TCP wormholes have connections, UDP ones flows."""
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    L = list(WORMHOLE_LABELS)
    accepted = _counter("wormhole_connections_accepted_total",
                        "TCP connections accepted and relayed (refused ones not counted).", L)
    active = _gauge("wormhole_connections_active", "TCP connections open now.", L)
    refused = _counter("wormhole_connections_refused_total",
                       "TCP connections turned away at accept by max-conns or the fd reserve.", L)
    flows = _counter("wormhole_udp_flows_total", "UDP flows opened (one per client address).", L)
    flows_active = _gauge("wormhole_udp_flows_active", "UDP flows open now.", L)
    dropped = _counter("wormhole_udp_datagrams_refused_total",
                       "UDP datagrams dropped because they would have opened a flow beyond max-conns "
                       "or the fd reserve.", L)
    bytes_in = _counter("wormhole_client_to_tail_bytes_total",
                        "Bytes relayed from clients to the tail (list: bytes_in).", L)
    bytes_out = _counter("wormhole_tail_to_client_bytes_total",
                         "Bytes relayed from the tail to clients (list: bytes_out).", L)
    dials = _counter("wormhole_tail_dial_failures_total",
                     "Connections dropped because their tail could not be reached (after retries).", L)
    runs = _counter("wormhole_trigger_runs_total",
                    "Trigger runs (the tail side built on a connection), by outcome (ok, failed).",
                    L + ["outcome"])
    durations = HistogramMetricFamily("wormhole_trigger_duration_seconds",
                                      "How long trigger runs took, whatever their outcome.", labels=L)
    TL = ["id", "tail"]  # a load-balanced wormhole's tails, by url
    tail_up = _gauge("wormhole_tail_up", "1 while a load-balanced wormhole's tail is up, 0 while it is "
                     "marked down (refused or timed out; probed with backoff).", TL)
    tail_active = _gauge("wormhole_tail_connections_active", "Connections (UDP: flows) open now to this tail.", TL)
    tail_total = _counter("wormhole_tail_connections_total", "Connections (UDP: flows) made to this tail.", TL)
    tail_failed = _counter("wormhole_tail_failures_total",
                           "Dials and probes of this tail that failed.", TL)
    for w in snap.get("wormholes", ()):
        for t in w.get("tails") or ():
            if "state" in t:
                tl = [w["id"], t["url"]]
                tail_up.add_metric(tl, 1 if t["state"] == "up" else 0)
                tail_active.add_metric(tl, t["connections"])
                tail_total.add_metric(tl, t["total"])
                tail_failed.add_metric(tl, t["failures"])
        labels = [w["id"], w.get("peer") or "", w.get("transport") or ""]
        if w.get("proto") == "udp":
            flows.add_metric(labels, w["total"])
            flows_active.add_metric(labels, w["connections"])
            dropped.add_metric(labels, w["refused"])
        else:
            accepted.add_metric(labels, w["total"])
            active.add_metric(labels, w["connections"])
            refused.add_metric(labels, w["refused"])
        bytes_in.add_metric(labels, w["bytes_in"])
        bytes_out.add_metric(labels, w["bytes_out"])
        dials.add_metric(labels, w.get("dial_failures", 0))
        ok, failed = w.get("trigger_ok", 0), w.get("trigger_failed", 0)
        if w.get("trigger") or ok or failed:
            runs.add_metric(labels + ["ok"], ok)
            runs.add_metric(labels + ["failed"], failed)
            counts = w.get("trigger_buckets") or [0] * (len(TRIGGER_BUCKETS) + 1)
            cumulative, buckets = 0, []
            for bound, n in zip((*TRIGGER_BUCKETS, float("inf")), counts):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))
            durations.add_metric(labels, buckets, w.get("trigger_sum", 0.0))

    T = list(TUNNEL_LABELS)
    up = _gauge("wormhole_tunnel_up", "1 when the tunnel's interface (or ipsec states) is in place, else 0.", T)
    rx = _counter("wormhole_tunnel_rx_bytes_total", "Bytes the tunnel received from its peer.", T)
    tx = _counter("wormhole_tunnel_tx_bytes_total", "Bytes the tunnel sent to its peer.", T)
    age = _gauge("wormhole_tunnel_handshake_age_seconds",
                 "Seconds since the latest WireGuard handshake (absent before the first one, and for ipsec).", T)
    now = snap.get("time") or time.time()
    for t in snap.get("tunnels", ()):
        labels = [t["peer"], t.get("type") or "", t.get("interface") or ""]
        up.add_metric(labels, 1 if t.get("state") == "up" else 0)
        rx.add_metric(labels, t.get("rx_bytes") or 0)
        tx.add_metric(labels, t.get("tx_bytes") or 0)
        if t.get("latest_handshake") is not None:
            age.add_metric(labels, max(0.0, now - t["latest_handshake"]))

    requests = _counter("wormhole_control_requests_total",
                        "Control-channel requests by method and outcome (ok; invalid: a JSON-RPC error "
                        "such as bad parameters or an unknown method; refused; failed).", ["method", "outcome"])
    for r in snap.get("requests", ()):
        requests.add_metric([r["method"], r["outcome"]], r["count"])
    restores = _counter("wormhole_restore_records_total",
                        "Wormhole records read at start, by outcome (restored, failed).", ["outcome"])
    restores.add_metric(["restored"], snap.get("restored", 0))
    restores.add_metric(["failed"], snap.get("restore_failed", 0))
    failed_records = _gauge("wormhole_failed_records",
                            "Records listed as failed now (not restored at start, not deleted since).", [])
    failed_records.add_metric([], snap.get("failed_records", 0))
    return [accepted, active, refused, flows, flows_active, dropped, bytes_in, bytes_out, dials, runs,
            durations, tail_up, tail_active, tail_total, tail_failed, up, rx, tx, age, requests, restores,
            failed_records]


# --- the shell: the daemon's objects, read on the loop; the HTTP server ------------------------

class Exporter:
    """Serves /metrics over HTTP (prometheus_client's threaded server) from the daemon's
    objects, which it reads on the event loop at each scrape."""

    def __init__(self, wormholes: Wormholes, tunnels: Tunnels | None, control: ControlServer | None,
                 loop: asyncio.AbstractEventLoop | None = None, timeout: float = SNAPSHOT_TIMEOUT) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self._wormholes, self._tunnels, self._control = wormholes, tunnels, control
        self._loop = loop or asyncio.get_running_loop()
        self._timeout = timeout
        self._httpd = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        ProcessCollector(registry=self.registry)  # process_*: CPU, memory, open fds of the daemon

    async def snapshot(self) -> dict:
        """The plain values `families` reads; runs on the event loop."""
        rows = []
        for seg in self._wormholes.segments():
            d, c = seg.describe(), seg.counters
            rows.append({"id": d["id"], "peer": d.get("remote"), "transport": d.get("transport"),
                         "proto": seg.plan.head.proto, "trigger": bool(seg.plan.trigger),
                         "connections": d["connections"], "total": d["total"], "bytes_in": d["bytes_in"],
                         "bytes_out": d["bytes_out"], "refused": d["refused"], "dial_failures": c.dial_failures,
                         "trigger_ok": c.trigger_ok, "trigger_failed": c.trigger_failed,
                         "trigger_buckets": list(c.trigger_buckets), "trigger_sum": c.trigger_sum,
                         "tails": d.get("tails")})
        requests = []
        if self._control is not None:
            requests = [{"method": m, "outcome": o, "count": n} for (m, o), n in self._control.requests.items()]
        return {"time": time.time(), "wormholes": rows,
                "tunnels": await self._tunnels.list() if self._tunnels is not None else [],
                "requests": requests, "restored": self._wormholes.restored,
                "restore_failed": self._wormholes.restore_failed,
                "failed_records": self._wormholes.failed_count()}

    def collect(self):
        """prometheus_client's Collector: called on the HTTP server's thread, never the loop's."""
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("metrics: collect() on the event loop's thread would wait for itself")
        try:
            fut = asyncio.run_coroutine_threadsafe(self.snapshot(), self._loop)
        except RuntimeError:  # the loop is gone (the daemon is stopping)
            return
        try:
            snap = fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            log.warning("metrics: the daemon did not answer within %g s; this scrape has the process "
                        "metrics only", self._timeout)
            return
        except Exception as e:  # a bug must not take the server thread down; say it, serve the rest
            log.error("metrics: snapshot failed: %s: %s", type(e).__name__, e)
            return
        yield from families(snap)

    def start(self, host: str | None, port: int) -> None:
        """Listen on host:port (None: every address) in the calling thread's namespace, and
        serve from a thread of the library's; OSError if the address cannot be bound."""
        from prometheus_client import start_http_server

        if host is None:
            try:
                self._httpd, _ = start_http_server(port, "::", registry=self.registry)  # dual-stack
                return
            except OSError:  # no IPv6 here
                host = "0.0.0.0"
        self._httpd, _ = start_http_server(port, host, registry=self.registry)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    async def aclose(self) -> None:
        """Stop serving; a scrape under way still gets its snapshot (the loop keeps running)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            await asyncio.to_thread(httpd.shutdown)
            httpd.server_close()
