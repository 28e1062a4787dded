#!/usr/bin/env python3
"""Side-by-side benchmark of wormhole against other TCP proxies on loopback.

Each measurement is taken directly and through every proxy (rows: direct, wormhole with
its native engine, wormhole-python with WORMHOLE_ENGINE=python, systemd-socket-proxyd,
haproxy, socat), the rates as the median of --repeat runs:

* single-stream TCP throughput: iperf3 client -> [proxy] -> iperf3 server;
* new connections per second: wrk with ``Connection: close`` (one TCP
  connection per request) -> [proxy] -> nginx returning a 2-byte body, and the
  proxy's CPU time per connection meanwhile;
* keep-alive requests per second: wrk -c32 over kept-alive connections, same nginx; and
  again the wormhole row against haproxy alone, run for run, alternating, with the host's
  steal time of each run (bench/sidebyside.py: on a VM that is what moves the rate most);
* idle connections: 8,000 connections held through the proxy to a target that
  accepts and holds them (bench/loadgen.py), and what they cost: the proxy's RSS
  and fds, and the kernel's slab memory, per connection;
* UDP datagrams per second: 64-byte datagrams, 32 in flight, to a UDP echo
  (direct, wormhole, socat);
* ``wormhole ping`` against the row's daemon: p50 and p95.
* the CLI itself: wall time of ``wormhole ping`` and ``wormhole list``, a fresh process each
  (from exec to exit, as a shell runs them): p50 and p95.
* a handover (``wormholed --takeover``): the gaps in a steady stream of echoes through
  takeovers (the pause a connection sees), and the time a takeover takes with 1, 100 and
  5,000 idle connections held through the wormhole.

Then the goals for the wormhole rows, and the tunnel table (bench/tunnel.py): iperf3
through a WireGuard tunnel between two network namespaces, built by
``wormhole tunnel-create`` and built by hand.

Usage: bench/run.py [--duration S] [--repeat N] [--idle-conns N] [--only NAMES] [--json]

Every process started here runs in its own process group and is killed when
its ``with`` block ends (normally, on error, on Ctrl-C or on SIGTERM); the
temporary directory (configs, logs, the wormhole key and state) is removed.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, ContextManager, Iterator

ROOT = Path(__file__).resolve().parent.parent
# Where wormhole and wormholed are; WORMHOLE_BENCH_BIN=DIR benches another build.
WORMHOLE_BIN = Path(os.environ.get("WORMHOLE_BENCH_BIN") or ROOT / ".venv" / "bin")
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"  # idle target and client, echo servers, UDP client
PROXYD = "/lib/systemd/systemd-socket-proxyd"
SETTLE = 0.5  # seconds between a listener's readiness and its measurement
ROWS = ("direct", "wormhole", "wormhole-python", "systemd-socket-proxyd", "haproxy", "socat")
ENGINES = {"wormhole": "native", "wormhole-python": "python"}  # WORMHOLE_ENGINE of each wormhole row
TUNNEL = "tunnel"  # the tunnel table (bench/tunnel.py), after the proxy rows
NAMES = ROWS + (TUNNEL,)
PROXY_TOOLS = ("iperf3", "wrk", "nginx", "haproxy", "socat", "systemd-socket-activate")

REPEAT = 3  # runs per rate; the table shows their median
KEEPALIVE_CONNS = 32  # wrk -c for the keep-alive rate
IDLE_CONNS = 8000  # connections held for the idle-connection columns
IDLE_PROBE = 200  # connections of the probe that finds a proxy's fds per connection
IDLE_ROWS = ("direct", "wormhole", "wormhole-python", "systemd-socket-proxyd", "haproxy")  # socat forks per connection
UDP_ROWS = ("direct", "wormhole", "socat")  # haproxy and proxyd relay TCP only; wormhole-python: same UDP relay
UDP_WINDOW, UDP_SIZE = 32, 64  # datagrams in flight, bytes each
UDP_SECONDS = 3.0  # per UDP run (at most --duration)
PING_RUNS = 30


class BenchError(Exception):
    """A measurement or a setup step failed; the message goes in the table."""


# --------------------------------------------------------------------------
# Pure functions: parsing tool output and formatting results


def parse_iperf3(text: str) -> float:
    """Received bits per second from ``iperf3 --json`` output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 output is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BenchError("iperf3 output is not a JSON object")
    if data.get("error"):
        raise BenchError(f"iperf3: {data['error']}")
    try:
        bps = data["end"]["sum_received"]["bits_per_second"]
    except (KeyError, TypeError):
        raise BenchError("iperf3 output has no end.sum_received.bits_per_second") from None
    if not isinstance(bps, (int, float)) or isinstance(bps, bool):
        raise BenchError(f"iperf3 bits_per_second is not a number: {bps!r}")
    return float(bps)


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests_per_sec: float
    requests: int | None = None
    socket_errors: int = 0  # connect + read + write + timeout
    non_2xx: int = 0


_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9}


def _number(text: str) -> float:
    """'12345.67' -> 12345.67; wrk scales some figures: '1.23k' -> 1230."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kKmMgG]?)", text)
    if not m:
        raise BenchError(f"not a number: {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """Requests/sec, request count and error counts from wrk's text output."""
    m = re.search(r"^Requests/sec:\s+(\S+)", text, re.MULTILINE)
    if not m:
        raise BenchError("wrk output has no Requests/sec line")
    rps = _number(m.group(1))
    m = re.search(r"^\s*([0-9]+) requests in ", text, re.MULTILINE)
    requests = int(m.group(1)) if m else None
    errors = 0
    m = re.search(
        r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)",
        text,
    )
    if m:
        errors = sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", text)
    non_2xx = int(m.group(1)) if m else 0
    return WrkResult(rps, requests, errors, non_2xx)


def parse_create_output(text: str) -> tuple[str, str, int]:
    """``wormhole create`` prints "ID URL": return (id, host, port)."""
    words = text.split()
    if len(words) != 2:
        raise BenchError(f"unexpected output of wormhole create: {text.strip()!r}")
    wid, url = words
    m = re.fullmatch(r"(?:[a-z]+://)?(?:[^@/]*@)?\[?([^\]/]*?)\]?:([0-9]+)/?", url)
    if not m:
        raise BenchError(f"cannot read a port in wormhole create's URL {url!r}")
    return wid, m.group(1) or "127.0.0.1", int(m.group(2))


def parse_ping(text: str) -> float:
    """``wormhole ping`` prints the round trip in milliseconds, e.g. "3.125"."""
    try:
        return float(text.strip())
    except ValueError:
        raise BenchError(f"unexpected output of wormhole ping: {text.strip()[:80]!r}") from None


def parse_udp_client(text: str) -> tuple[float, float | None]:
    """Echoes per second from loadgen.py udp-client's JSON line, and the client's CPU seconds
    per second meanwhile (near 1: the client, not the proxy, was the limit)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise BenchError(f"udp-client output is not JSON: {text.strip()[:80]!r}") from None
    if not isinstance(data, dict):
        raise BenchError("udp-client output is not a JSON object")
    if data.get("error"):
        raise BenchError(f"udp-client: {data['error']}")
    try:
        received, seconds = int(data["received"]), float(data["seconds"])
    except (KeyError, TypeError, ValueError):
        raise BenchError("udp-client output has no received/seconds") from None
    if seconds <= 0 or not received:
        raise BenchError(f"no echo came back in {seconds:.1f} s")
    cpu = data.get("client_cpu")
    return received / seconds, float(cpu) if isinstance(cpu, (int, float)) else None


def parse_status(text: str) -> dict[str, int]:
    """A loadgen.py status line, "accepted 12 open 3" -> {"accepted": 12, "open": 3}."""
    words = text.split()
    if not words or len(words) % 2:
        raise BenchError(f"unreadable status {text.strip()!r}")
    try:
        return {k: int(v) for k, v in zip(words[::2], words[1::2])}
    except ValueError:
        raise BenchError(f"unreadable status {text.strip()!r}") from None


# Caches left out of the kernel's memory for idle connections: TIME_WAIT and SYN_RECV mini
# sockets. An idle connection has neither; those of earlier runs or other work on the
# machine come and go on timers of their own (TIME_WAIT: 60 s) and would be noise.
SLAB_SKIP = re.compile(r"(tw_sock|request_sock)_")


def parse_slabinfo(text: str) -> dict[str, int]:
    """/proc/slabinfo (2.1) -> bytes in use per cache (active objects x object size).

    /proc inodes are left out, with a dentry each: whoever lists /proc/PID/fd (a monitor,
    lsof, ps) makes one of each per fd listed, which says nothing of what a connection costs
    and would be counted against the proxy with the most fds."""
    caches: dict[str, int] = {}
    objects: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        if line.startswith(("slabinfo", "#")) or not line.strip():
            continue
        fields = line.split()
        try:
            name, active, size = fields[0], int(fields[1]), int(fields[3])
        except (IndexError, ValueError):
            raise BenchError(f"unreadable /proc/slabinfo line {line[:60]!r}") from None
        objects[name] = (active, size)
        if not SLAB_SKIP.match(name):
            caches[name] = caches.get(name, 0) + active * size
    if not caches:
        raise BenchError("/proc/slabinfo lists no cache")
    if "proc_inode_cache" in caches:
        del caches["proc_inode_cache"]
        if "dentry" in caches:
            caches["dentry"] -= objects["proc_inode_cache"][0] * objects["dentry"][1]
    return caches


def parse_sockstat_tcp_mem(text: str) -> int:
    """Pages the kernel counts for TCP socket buffers: ``mem`` of /proc/net/sockstat's TCP line."""
    m = re.search(r"^TCP:.*\bmem ([0-9]+)", text, re.MULTILINE)
    if not m:
        raise BenchError("/proc/net/sockstat has no TCP mem")
    return int(m.group(1))


def parse_nofile_limit(text: str) -> int | None:
    """The soft 'Max open files' of /proc/PID/limits (None: unlimited or not found)."""
    m = re.search(r"^Max open files\s+(\S+)", text, re.MULTILINE)
    return int(m.group(1)) if m and m.group(1).isdigit() else None


def status_rss_kib(text: str) -> int:
    """VmRSS of /proc/PID/status, in KiB (0 for a zombie)."""
    m = re.search(r"^VmRSS:\s+([0-9]+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def proc_pgrp(stat: str) -> int:
    """The process group of a /proc/PID/stat line."""
    return int(stat.rsplit(")", 1)[1].split()[2])


def udp_bound(proc_net_udp: str, port: int) -> bool:
    """Whether /proc/net/udp lists a socket bound to 127.0.0.1:PORT."""
    want = (f"0100007F:{port:04X}", f"7F000001:{port:04X}")  # the address in host byte order
    return any(line.split()[1:2] and line.split()[1] in want for line in proc_net_udp.splitlines()[1:])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def proc_cpu_seconds(stat: str, ticks: int) -> float:
    """utime+stime+cutime+cstime from a /proc/PID/stat line (children: socat's forks)."""
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / ticks


@dataclasses.dataclass
class Row:
    name: str
    bps: float | None = None  # iperf3 throughput, bits/s
    conn_per_s: float | None = None  # wrk requests/s with one connection each
    cpu_s_per_gb: float | None = None  # the proxy's CPU seconds per GB relayed (iperf3)
    cpu_us_per_conn: float | None = None  # the proxy's CPU microseconds per connection (wrk)
    keepalive_per_s: float | None = None  # wrk requests/s over KEEPALIVE_CONNS kept-alive connections
    idle_conns: int | None = None  # connections held for the idle columns
    idle_proc_kib: float | None = None  # the proxy's RSS growth per idle connection
    idle_kernel_kib: float | None = None  # kernel growth per idle connection, less direct's (direct: its own)
    idle_fds: float | None = None  # the proxy's fd count growth per idle connection
    udp_per_s: float | None = None  # UDP echoes per second
    ping_ms: list[float] = dataclasses.field(default_factory=list)  # wormhole ping round trips
    error: str | None = None  # whole row unavailable (e.g. daemon did not start)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # per column
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # every run, for --json
    idle_caches: dict[str, float] = dataclasses.field(default_factory=dict)  # slab growth per conn, bytes

    @property
    def idle_kib(self) -> float | None:
        """KiB per idle connection: the proxy's and the kernel's (none for direct)."""
        if self.name == "direct" or self.idle_proc_kib is None or self.idle_kernel_kib is None:
            return None
        return self.idle_proc_kib + self.idle_kernel_kib

    @property
    def ping_p50(self) -> float | None:
        return percentile(self.ping_ms, 50) if self.ping_ms else None

    @property
    def ping_p95(self) -> float | None:
        return percentile(self.ping_ms, 95) if self.ping_ms else None

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.samples.setdefault(key, []).append(value)

    def settle(self) -> None:
        """Each rate (and the CPU per unit) is the median of its runs."""
        for key in ("bps", "conn_per_s", "cpu_s_per_gb", "cpu_us_per_conn", "keepalive_per_s", "udp_per_s"):
            if self.samples.get(key):
                setattr(self, key, median(self.samples[key]))


def _fmt(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else fmt.format(value)


def ratio(value: float | None, anchor: float | None) -> float | None:
    return None if value is None or not anchor else value / anchor


@dataclasses.dataclass(frozen=True)
class Col:
    """A column of a side-by-side table: its head, width, the value of a row, and the
    key of the row's notes that puts a footnote marker in its cells."""

    head: str
    width: int
    get: Callable[[Row], float | None]
    fmt: str = "{:.0f}"
    note: str | None = None
    group: str = ""  # a heading over consecutive columns of the same group
    missing: str = "-"  # a cell without a value (and without a note)


def _ratio_col(get: Callable[[Row], float | None], anchor: Row | None, head: str = "ratio",
               group: str = "", width: int = 6) -> Col:
    value = None if anchor is None or anchor.error else get(anchor)
    return Col(head, width, lambda r: ratio(get(r), value), "{:.2f}", group=group, missing="n/a")


def format_columns(rows: list[Row], cols: list[Col], header: str = "") -> str:
    """One side-by-side table: a line per row, a footnote per noted cell."""
    width = max([len("proxy")] + [len(r.name) for r in rows])
    lines = [header] if header else []
    if any(c.group for c in cols):
        groups, i = [], 0
        while i < len(cols):
            j = i
            while j < len(cols) and cols[j].group == cols[i].group:
                j += 1
            span = sum(c.width + 1 for c in cols[i:j]) - 1
            groups.append(f"{cols[i].group:^{span}}")
            i = j
        lines.append(f"{'':<{width}}  " + " ".join(groups).rstrip())
    heads = " ".join(f"{c.head:>{c.width}}" for c in cols)
    lines.append(f"{'proxy':<{width}}  {heads}")
    lines.append("-" * (width + 2 + len(heads)))
    footnotes: list[str] = []
    for row in rows:
        if row.error:
            lines.append(f"{row.name:<{width}}  n/a ({row.error})")
            continue
        cells = []
        for c in cols:
            value = c.get(row)
            text = _fmt(value, c.fmt, "n/a" if c.note in row.notes else c.missing)
            if c.note in row.notes:
                footnotes.append(f"{row.name} {c.note}: {row.notes[c.note]}")
                text += f" [{len(footnotes)}]"
            cells.append(f"{text:>{c.width}}")
        lines.append(f"{row.name:<{width}}  " + " ".join(cells))
    lines += [f"[{i}] {note}" for i, note in enumerate(footnotes, 1)]
    return "\n".join(lines)


def _anchor(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name and not r.error), None)


def tcp_table(rows: list[Row], header: str = "") -> str:
    """Throughput, conn/s with the proxy's CPU, keep-alive: ratios to direct."""
    d = _anchor(rows, "direct")
    gbps = lambda r: r.bps and r.bps / 1e9  # noqa: E731
    return format_columns(rows, [
        Col("throughput Gbit/s", 18, gbps, "{:.2f}", "throughput"), _ratio_col(gbps, d),
        Col("conn/s", 9, lambda r: r.conn_per_s, note="conn/s"), _ratio_col(lambda r: r.conn_per_s, d),
        Col("CPU s/GB", 9, lambda r: r.cpu_s_per_gb, "{:.3f}"),
        Col("CPU us/conn", 12, lambda r: r.cpu_us_per_conn),
        Col("keep-alive req/s", 17, lambda r: r.keepalive_per_s, note="keep-alive"),
        _ratio_col(lambda r: r.keepalive_per_s, d),
    ], header)


def idle_table(rows: list[Row], header: str = "") -> str:
    """Idle connections, UDP, ping."""
    d = _anchor(rows, "direct")
    return format_columns(rows, [
        Col("idle KiB/conn", 14, lambda r: r.idle_kib, "{:.1f}", "idle"),
        Col("process", 8, lambda r: r.idle_proc_kib, "{:.1f}"),
        Col("kernel", 7, lambda r: r.idle_kernel_kib, "{:.1f}"),
        Col("fds/conn", 9, lambda r: r.idle_fds, "{:.2f}"),
        Col("UDP dgram/s", 12, lambda r: r.udp_per_s, note="UDP"), _ratio_col(lambda r: r.udp_per_s, d),
        Col("ping p50 ms", 12, lambda r: r.ping_p50, "{:.1f}", "ping"),
        Col("p95 ms", 7, lambda r: r.ping_p95, "{:.1f}"),
    ], header)


def ratio_table(rows: list[Row], header: str = "") -> str:
    """The rates against systemd-socket-proxyd and haproxy (and UDP against socat)."""
    pxd, hap, soc = (_anchor(rows, n) for n in ("systemd-socket-proxyd", "haproxy", "socat"))
    cols = []
    for group, get in (("throughput", lambda r: r.bps), ("conn/s", lambda r: r.conn_per_s),
                       ("keep-alive req/s", lambda r: r.keepalive_per_s)):
        cols += [_ratio_col(get, pxd, "/proxyd", group, 8), _ratio_col(get, hap, "/haproxy", group, 9)]
    cols.append(_ratio_col(lambda r: r.cpu_us_per_conn, hap, "/haproxy", "CPU us/conn", 11))
    cols.append(_ratio_col(lambda r: r.udp_per_s, soc, "/socat", "UDP", 7))
    return format_columns(rows, cols, header)


@dataclasses.dataclass(frozen=True)
class Goal:
    label: str
    judge: Callable[[Row, dict[str, Row]], tuple[str, bool | None] | None]  # None: no figure


def _ratio_goal(get: Callable[[Row], float | None], anchor: str, at_least: float):
    def judge(row: Row, by: dict[str, Row]):
        a = by.get(anchor)
        r = ratio(get(row), get(a) if a else None)
        if r is None:
            return None
        r = round(r, 2)  # judged as shown
        return f"{r:.2f}x", r >= at_least
    return judge


def _at_most(get: Callable[[Row], float | None], limit: float, fmt: str):
    def judge(row: Row, by: dict[str, Row]):
        v = get(row)
        if v is None:
            return None
        shown = fmt.format(v)
        return shown, float(shown) <= limit
    return judge


def _cpu_goal(row: Row, by: dict[str, Row]):
    h = by.get("haproxy")
    if row.cpu_us_per_conn is None or h is None or h.cpu_us_per_conn is None:
        return None
    w, a = round(row.cpu_us_per_conn), round(h.cpu_us_per_conn)
    return f"{w} vs {a}", w <= a


def _udp_goal(row: Row, by: dict[str, Row]):
    if row.name not in UDP_ROWS:
        return "-", None  # the same UDP relay as the wormhole row
    return _ratio_goal(lambda r: r.udp_per_s, "socat", UDP_GOAL)(row, by)


# Set from the first measurements (1.31x and 1.44x socat, on a loaded and a quiet machine):
# the UDP relay must keep that lead.
UDP_GOAL = 1.25


GOALS = (
    Goal("conn/s >= 1.0x haproxy", _ratio_goal(lambda r: r.conn_per_s, "haproxy", 1.0)),
    Goal("CPU us/conn <= haproxy's", _cpu_goal),
    Goal("keep-alive req/s >= 1.2x haproxy", _ratio_goal(lambda r: r.keepalive_per_s, "haproxy", 1.2)),
    Goal("idle KiB/conn (process + kernel) <= 8", _at_most(lambda r: r.idle_kib, 8, "{:.1f}")),
    Goal("idle fds/conn <= 2", _at_most(lambda r: r.idle_fds, 2, "{:.2f}")),
    Goal("throughput >= 0.75x direct", _ratio_goal(lambda r: r.bps, "direct", 0.75)),
    Goal("throughput >= 1.0x systemd-socket-proxyd", _ratio_goal(lambda r: r.bps, "systemd-socket-proxyd", 1.0)),
    Goal("wormhole ping p50 <= 5 ms", _at_most(lambda r: r.ping_p50, 5, "{:.1f}")),
    Goal(f"UDP dgram/s >= {UDP_GOAL}x socat", _udp_goal),
)


def judge_goals(rows: list[Row]) -> list[tuple[str, dict[str, tuple[str, bool | None] | None]]]:
    """For each goal, each wormhole row's figure and whether it meets the goal (None: no goal)."""
    by = {r.name: r for r in rows if not r.error}
    ours = [r for r in rows if r.name in ENGINES]
    return [(g.label, {r.name: (None if r.error else g.judge(r, by)) for r in ours}) for g in GOALS]


def goals_table(rows: list[Row], header: str = "") -> str:
    judged = judge_goals(rows)
    names = [r.name for r in rows if r.name in ENGINES]
    if not names:
        return ""
    width = max(len(label) for label, _ in judged)
    cw = [max(len(n), 20) for n in names]
    lines = [header] if header else []
    heads = " ".join(f"{n:>{w}}" for n, w in zip(names, cw))
    lines.append(f"{'goal':<{width}}  {heads}")
    lines.append("-" * (width + 2 + len(heads)))
    for label, cells in judged:
        texts = []
        for n, w in zip(names, cw):
            cell = cells[n]
            text = "n/a" if cell is None else cell[0] + {True: " ok", False: " MISS", None: ""}[cell[1]]
            texts.append(f"{text:>{w}}")
        lines.append(f"{label:<{width}}  " + " ".join(texts))
    return "\n".join(lines)


def format_table(rows: list[Row], header: str = "") -> str:
    """Every table of the proxy rows: TCP, idle/UDP/ping, ratios, goals."""
    conns = max((r.idle_conns or 0 for r in rows), default=0) or IDLE_CONNS
    pings = max((len(r.ping_ms) for r in rows), default=0) or PING_RUNS
    idle_header = IDLE_HEADER.format(conns=f"{conns:,}", size=UDP_SIZE, window=UDP_WINDOW, pings=pings)
    parts = [tcp_table(rows, header + TCP_HEADER), idle_table(rows, idle_header),
             ratio_table(rows, RATIO_HEADER)]
    goals = goals_table(rows, GOALS_HEADER)
    if goals:
        parts.append(goals)
    return "\n\n".join(parts)


TCP_HEADER = ("throughput: iperf3, 1 TCP stream; conn/s: wrk -t1 -c50, Connection: close, nginx 'return 200'; "
              "CPU: the proxy's, per GB and per connection;\nkeep-alive: wrk -t1 -c32, kept-alive "
              "connections, same nginx; each rate the median of the runs; ratio: to direct\n")
IDLE_HEADER = ("idle: {conns} connections held through the proxy to an idle target; per connection: the proxy's "
               "RSS (process),\nthe kernel's slab objects less direct's (kernel; direct: the client's and the "
               "target's sockets) and the proxy's fds;\nUDP: {size}-byte datagrams, {window} in flight, echoed; "
               "ping: `wormhole ping` to the row's daemon, {pings} runs; ratio: to direct\n")
RATIO_HEADER = "ratios to systemd-socket-proxyd and haproxy (and UDP to socat), same run\n"
GOALS_HEADER = "goals of the wormhole rows (ok/MISS)\n"


def rows_to_json(rows: list[Row], meta: dict, tunnel: dict | None = None) -> str:
    by = {r.name: r for r in rows if not r.error}

    def ratios(get):
        return {a: ratio(get(r), get(by[a])) if a in by else None
                for a in ("direct", "systemd-socket-proxyd", "haproxy")}
    out = []
    for r in rows:
        direct = by.get("direct")
        out.append({
            "name": r.name,
            "throughput_bps": r.bps,
            "throughput_ratio": ratio(r.bps, direct.bps) if direct else None,
            "conn_per_s": r.conn_per_s,
            "conn_ratio": ratio(r.conn_per_s, direct.conn_per_s) if direct else None,
            "cpu_s_per_gb": r.cpu_s_per_gb,
            "cpu_us_per_conn": r.cpu_us_per_conn,
            "keepalive_per_s": r.keepalive_per_s,
            "ratios": {"throughput": ratios(lambda x: x.bps), "conn_per_s": ratios(lambda x: x.conn_per_s),
                       "keepalive_per_s": ratios(lambda x: x.keepalive_per_s)},
            "idle_connections": r.idle_conns,
            "idle_kib_per_conn": r.idle_kib,
            "idle_process_kib_per_conn": r.idle_proc_kib,
            "idle_kernel_kib_per_conn": r.idle_kernel_kib,
            "idle_fds_per_conn": r.idle_fds,
            "idle_slab_bytes_per_conn": r.idle_caches,
            "udp_dgram_per_s": r.udp_per_s,
            "udp_ratio_socat": ratio(r.udp_per_s, by["socat"].udp_per_s) if "socat" in by else None,
            "ping_p50_ms": r.ping_p50,
            "ping_p95_ms": r.ping_p95,
            "ping_ms": r.ping_ms,
            "samples": r.samples,
            "error": r.error,
            "notes": r.notes,
        })
    goals = [{"goal": label, "rows": {n: (None if c is None else {"figure": c[0], "ok": c[1]})
                                      for n, c in cells.items()}}
             for label, cells in judge_goals(rows)]
    doc = {**meta, "rows": out, "goals": goals}
    if tunnel is not None:
        doc["tunnel"] = tunnel
    return json.dumps(doc, indent=2)


def parse_only(text: str | None) -> list[str]:
    """``--only wormhole,socat`` -> rows to run, in table order; direct whenever a
    proxy row runs (it anchors their ratios); ``tunnel`` (the tunnel table) last."""
    if not text:
        return list(NAMES)
    names = {n.strip() for n in re.split(r"[,\s]+", text) if n.strip()}
    unknown = names - set(NAMES)
    if unknown:
        raise ValueError(f"unknown names: {', '.join(sorted(unknown))} (choose from {', '.join(NAMES)})")
    proxies = names & set(ROWS) - {"direct"}
    return [n for n in NAMES if n in names or (n == "direct" and (proxies or names == {"direct"}))]


def required_tools(names: list[str], tunnel_tools: tuple[str, ...] = ()) -> list[str]:
    """The tools the selected rows run, each once, in a stable order."""
    tools: list[str] = []
    if any(n in ROWS for n in names):
        tools += PROXY_TOOLS
    if TUNNEL in names:
        tools += tunnel_tools
    return list(dict.fromkeys(tools))


# --------------------------------------------------------------------------
# Processes and ports


def free_port() -> int:
    """An ephemeral port nothing listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A background process in its own process group, killed on exit.

    Output goes to LOGDIR/NAME.log; ``tail()`` gives its end for error messages.
    ``env`` adds to (or overrides) this process's environment.
    """

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None):
        self.name, self.argv = name, [str(a) for a in argv]
        self.log = logdir / f"{name}.log"
        self.env = {**os.environ, **env} if env else None
        self.popen: subprocess.Popen | None = None

    def __enter__(self) -> "Proc":
        with open(self.log, "ab") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # own group: Ctrl-C reaches us, we stop it
                    env=self.env,
                )
            except OSError as exc:
                raise BenchError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        p = self.popen
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)  # the group: socat's and proxyd's children too
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # stragglers of the group
            os.killpg(p.pid, signal.SIGKILL)

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


class StampedProc(Proc):
    """A Proc whose output comes through a pipe: a thread writes it to the log and keeps each
    line with the time it arrived (time.monotonic()), for a daemon whose log has no times."""

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict[str, str] | None = None):
        super().__init__(name, argv, logdir, env)
        self.lines: list[tuple[float, str]] = []
        self.reader: threading.Thread | None = None

    def __enter__(self) -> "StampedProc":
        try:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        except OSError as exc:
            raise BenchError(f"cannot start {self.argv[0]}: {exc.strerror}") from None
        self.reader = threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True)
        self.reader.start()
        return self

    def _read(self, pipe) -> None:
        with pipe, open(self.log, "ab") as log:
            for raw in pipe:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
                log.write(raw)
                log.flush()


def wait_listening(port: int, proc: Proc | None = None, timeout: float = 10.0) -> None:
    """Poll connect() until something accepts on 127.0.0.1:PORT."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            where = f" ({proc.tail()})" if proc else ""
            raise BenchError(f"nothing listens on port {port} after {timeout:.0f} s{where}")
        time.sleep(0.05)


def wait_udp_bound(port: int, proc: Proc | None = None, timeout: float = 10.0) -> None:
    """Poll /proc/net/udp until a socket is bound to 127.0.0.1:PORT."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        with open("/proc/net/udp") as f:
            if udp_bound(f.read(), port):
                return
        if time.monotonic() > deadline:
            raise BenchError(f"nothing bound to UDP port {port} after {timeout:.0f} s")
        time.sleep(0.05)


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client tool in the foreground (killed by subprocess.run on Ctrl-C/timeout)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from None


def raise_nofile() -> int:
    """RLIMIT_NOFILE for this process and everything it starts: as high as allowed (the hard
    limit goes up only with CAP_SYS_RESOURCE); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 4 * IDLE_CONNS + 4096)
    for limits in ((want, want), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def max_conns() -> int:
    """The connection limit configured in haproxy and proxyd: what 2 fds each leave room for."""
    return max(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)


# --------------------------------------------------------------------------
# Servers (the targets) and clients (the measurements)


@contextlib.contextmanager
def iperf3_server(tmp: Path) -> Iterator[int]:
    port = free_port()
    with Proc("iperf3-server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", port], tmp) as p:
        wait_listening(port, p)
        yield port


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;  # keep-alive runs: one connection for the whole run
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "ok"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(tmp: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
    argv = ["nginx", "-p", tmp, "-c", conf, "-e", tmp / "nginx-error.log"]
    with Proc("nginx", argv, tmp) as p:
        wait_listening(port, p)
        yield port


def read_status(path: Path) -> dict[str, int]:
    try:
        return parse_status(path.read_text())
    except FileNotFoundError:
        return {}


@dataclasses.dataclass(frozen=True)
class IdleTarget:
    port: int
    status: Path  # "accepted A open O"
    proc: Proc

    def wait(self, what: str, done: Callable[[dict[str, int]], bool], timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            st = read_status(self.status)
            if st and done(st):
                return st
            if not self.proc.alive():
                raise BenchError(f"the idle target exited: {self.proc.tail(1)}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what} within {timeout:.0f} s (target: {st})")
            time.sleep(0.05)


@contextlib.contextmanager
def idle_target(tmp: Path) -> Iterator[IdleTarget]:
    port = free_port()
    status = tmp / "idle-target.status"
    with Proc("idle-target", [sys.executable, LOADGEN, "idle-target", port, status], tmp) as p:
        wait_listening(port, p)
        target = IdleTarget(port, status, p)
        target.wait("the idle target's readiness probe was not closed", lambda st: st["open"] == 0, 10)
        yield target


@contextlib.contextmanager
def udp_echo(tmp: Path) -> Iterator[int]:
    port = free_port()
    with Proc("udp-echo", [sys.executable, LOADGEN, "udp-echo", port], tmp) as p:
        wait_udp_bound(port, p)
        yield port


def measure_throughput(port: int, duration: float) -> float:
    """One iperf3 run; a second one if the first fails (noted by the caller)."""
    try:
        return _iperf3_once(port, duration)
    except BenchError as first:
        time.sleep(1)
        try:
            bps = _iperf3_once(port, duration)
        except BenchError:
            raise first from None
        raise Retried(bps, str(first)) from None


class Retried(BenchError):
    """The measurement succeeded on a second attempt: value and first error."""

    def __init__(self, value: float, first_error: str):
        super().__init__(first_error)
        self.value = value


def _iperf3_once(port: int, duration: float) -> float:
    res = run_tool(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "--json"],
                   timeout=duration + 30)
    try:
        return parse_iperf3(res.stdout)
    except BenchError:
        if res.returncode != 0 and not res.stdout.strip():
            raise BenchError(f"iperf3 exited with {res.returncode}: {res.stderr.strip()[-200:]}") from None
        raise


def measure_wrk(port: int, duration: float, connections: int, close: bool) -> WrkResult:
    """wrk -t1 -cN: with ``Connection: close`` a new connection per request, else kept alive."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s",
            *(["-H", "Connection: close"] if close else []), f"http://127.0.0.1:{port}/"]
    res = run_tool(argv, timeout=duration + 30)
    if res.returncode != 0:
        out = (res.stderr.strip() or res.stdout.strip())[-200:]
        raise BenchError(f"wrk exited with {res.returncode}: {out}")
    result = parse_wrk(res.stdout)
    if not result.requests_per_sec:
        raise BenchError(f"no request completed ({result.socket_errors} socket errors)")
    return result


def measure_conn_rate(port: int, duration: float) -> WrkResult:
    return measure_wrk(port, duration, 50, close=True)


def measure_udp(port: int, seconds: float) -> tuple[float, float | None]:
    res = run_tool([sys.executable, str(LOADGEN), "udp-client", str(port), f"{seconds:g}",
                    str(UDP_WINDOW), str(UDP_SIZE)], timeout=seconds + 30)
    if res.returncode != 0:
        raise BenchError(f"udp-client exited with {res.returncode}: {res.stderr.strip()[-200:]}")
    return parse_udp_client(res.stdout)


# --------------------------------------------------------------------------
# Proxies: each is a context manager (tmp, target_port) -> (listening port, the proxy's pid)


@contextlib.contextmanager
def direct(tmp: Path, target: int) -> Iterator[tuple[int, int | None]]:
    yield target, None


@contextlib.contextmanager
def socket_proxyd(tmp: Path, target: int) -> Iterator[tuple[int, int]]:
    port = free_port()
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", PROXYD,
            f"--connections-max={max_conns()}", f"127.0.0.1:{target}"]
    with Proc(f"socket-proxyd-{target}", argv, tmp) as p:
        wait_listening(port, p)
        yield port, p.popen.pid


HAPROXY_CFG = """\
global
    # Enough for the idle connections: 2 fds each within RLIMIT_NOFILE.
    maxconn {maxconn}
    # One thread, like the other proxies here (socat forks, proxyd and the
    # wormhole daemon relay on one thread); HAProxy would otherwise use every CPU.
    nbthread 1
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server target 127.0.0.1:{target}
"""


@contextlib.contextmanager
def haproxy(tmp: Path, target: int) -> Iterator[tuple[int, int]]:
    port = free_port()
    cfg = tmp / f"haproxy-{target}.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, target=target, maxconn=max_conns()))
    with Proc(f"haproxy-{target}", ["haproxy", "-f", cfg, "-db"], tmp) as p:
        wait_listening(port, p)
        yield port, p.popen.pid


def _socat(tmp: Path, target: int, proto: str) -> Iterator[tuple[int, int]]:
    port = free_port()
    argv = ["socat", f"{proto}-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1", f"{proto}:127.0.0.1:{target}"]
    with Proc(f"socat-{proto.lower()}-{target}", argv, tmp) as p:
        (wait_udp_bound if proto == "UDP" else wait_listening)(port, p)
        yield port, p.popen.pid


@contextlib.contextmanager
def socat(tmp: Path, target: int) -> Iterator[tuple[int, int]]:
    yield from _socat(tmp, target, "TCP")


@contextlib.contextmanager
def socat_udp(tmp: Path, target: int) -> Iterator[tuple[int, int]]:
    yield from _socat(tmp, target, "UDP")


class Wormhole:
    """A wormholed for a wormhole row, driven through the wormhole CLI; ``engine`` is its
    WORMHOLE_ENGINE (native or python)."""

    def __init__(self, tmp: Path, engine: str = "native", args: tuple[str, ...] = (), stamped: bool = False):
        self.engine = engine
        self.args = args  # more wormholed flags (--metrics)
        self.stamped = stamped  # its output through a pipe, each line timed (StampedProc): the handover section
        self.tmp = Path(tempfile.mkdtemp(prefix=f"wormhole-{engine}-", dir=tmp))
        self.key = self.tmp / "key.secret"
        self.sock = self.tmp / "ctl.sock"
        self.ctl_port = free_port()  # for ping: TCP, as `wormhole ping` reaches a daemon by default
        self.proc: Proc | None = None

    def cli(self, *args: str, timeout: float = 15, tcp: bool = False) -> subprocess.CompletedProcess:
        addr = f"127.0.0.1:{self.ctl_port}" if tcp else f"unix://{self.sock}"
        argv = [str(WORMHOLE_BIN / "wormhole"), "-H", addr, "-K", str(self.key), *args]
        return run_tool(argv, timeout)

    def __enter__(self) -> "Wormhole":
        alphabet = string.ascii_letters + string.digits
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(secrets.choice(alphabet) for _ in range(32)))
        os.chmod(self.key, 0o600)
        self.proc = self.spawn()
        try:
            deadline = time.monotonic() + 10
            while True:
                if not self.proc.alive():
                    raise BenchError(f"wormholed exited with {self.proc.popen.returncode}: "
                                     f"{self.proc.tail(1)}")
                if self.sock.exists() and self.cli("ping", timeout=5).returncode == 0:
                    break
                if time.monotonic() > deadline:
                    tail = self.proc.tail(1)
                    raise BenchError("wormholed did not answer ping within 10 s"
                                     + (f" ({tail})" if tail else ""))
                time.sleep(0.1)
            m = re.search(r"TCP engine: (\w+)", self.proc.log.read_text(errors="replace"))
            if m and m.group(1) != self.engine:
                raise BenchError(f"wormholed runs the {m.group(1)} engine, not {self.engine}: "
                                 f"{self.proc.tail(1)}")
            return self
        except BaseException:
            self.proc.stop()
            raise

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.stop()  # SIGTERM, then SIGKILL after 5 s

    def spawn(self, *more: str) -> Proc:
        """Start a wormholed with this one's flags and MORE (--takeover: its successor)."""
        argv = [WORMHOLE_BIN / "wormholed", "-H", f"unix://{self.sock}", "-H", f"tcp://127.0.0.1:{self.ctl_port}",
                "-K", self.key, "--state-dir", self.tmp / "state", *self.args, *more]
        kind = StampedProc if self.stamped else Proc
        return kind("wormholed", argv, self.tmp, env={"WORMHOLE_ENGINE": self.engine}).__enter__()

    @contextlib.contextmanager
    def proxy(self, tmp: Path, target: int, proto: str = "tcp") -> Iterator[tuple[int, int]]:
        port = free_port()
        res = self.cli("create", "url", f"{proto}://127.0.0.1:{port}", "tail", "url", f"{proto}://127.0.0.1:{target}")
        if res.returncode != 0:
            raise BenchError(f"wormhole create failed: {(res.stderr or res.stdout).strip()[-200:]}")
        wid, _host, port = parse_create_output(res.stdout)
        try:
            (wait_udp_bound if proto == "udp" else wait_listening)(port, self.proc)
            yield port, self.proc.popen.pid
        finally:
            with contextlib.suppress(BenchError):
                self.cli("delete", wid)

    def ping(self, runs: int) -> list[float]:
        """`wormhole ping` RUNS times over TCP: the round trips it prints, in ms."""
        out = []
        for _ in range(runs):
            res = self.cli("ping", tcp=True)
            if res.returncode != 0:
                raise BenchError(f"wormhole ping failed: {(res.stderr or res.stdout).strip()[-200:]}")
            out.append(parse_ping(res.stdout))
        return out


Proxy = Callable[[Path, int], ContextManager[tuple[int, int | None]]]  # (port, pid)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a row measures through: its TCP proxy, its UDP proxy (None: it relays TCP only,
    or its UDP relay is another row's), its wormhole daemon (wormhole rows)."""

    tcp: Proxy
    udp: Proxy | None = None
    daemon: Wormhole | None = None


PLAIN = {
    "direct": Setup(direct, direct),
    "systemd-socket-proxyd": Setup(socket_proxyd),
    "haproxy": Setup(haproxy),
    "socat": Setup(socat, socat_udp),
}


@contextlib.contextmanager
def setup(name: str, tmp: Path) -> Iterator[Setup]:
    """The row's proxies; a wormhole row's daemon lives as long as this block."""
    if name not in ENGINES:
        yield PLAIN[name]
        return
    with Wormhole(tmp, ENGINES[name]) as daemon:
        udp = functools.partial(daemon.proxy, proto="udp") if name in UDP_ROWS else None
        yield Setup(daemon.proxy, udp, daemon)


# --------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class Options:
    duration: float = 5.0  # seconds per iperf3/wrk run
    repeat: int = REPEAT  # runs per rate
    idle_conns: int = IDLE_CONNS
    ping_runs: int = PING_RUNS

    @property
    def udp_seconds(self) -> float:
        return min(self.duration, UDP_SECONDS)


def cpu_meter(pid: int | None) -> Callable[[], float | None]:
    """Start counting pid's CPU time; the returned function gives the seconds used since."""
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return proc_cpu_seconds(f.read(), ticks)
        except (OSError, TypeError):
            return None

    start = read() if pid else None
    if start is None:
        return lambda: None

    def used() -> float | None:
        time.sleep(0.2)  # let socat reap the children that served the run
        now = read()
        return None if now is None else now - start
    return used


@dataclasses.dataclass
class Targets:
    iperf: int | None = None
    nginx: int | None = None
    idle: IdleTarget | None = None
    udp: int | None = None
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # column note -> why it has no target


def order_of(rows: list, i: int) -> list:
    """Round i's order of the rows: rotated every other round and reversed on odd ones, so that
    each row runs first and last as often (6 rounds run every order of 3 rows; of 2: A B, B A,
    B A, A B)."""
    k = i // 2 % len(rows) if rows else 0
    order = rows[k:] + rows[:k]
    return order[::-1] if i % 2 else order


def interleaved(rows: list[Row], note: str, runs: int, once: dict[str, Callable[[], None]]) -> None:
    """``runs`` rounds, each calling every row's ``once`` (it adds the row's samples) in
    order_of(round): a run of one row is seconds from the same round's run of every other, so a
    noisy minute (a VM's steal) weighs on all rows alike. Failures go in the row's note."""
    names = [r.name for r in rows if r.name in once]
    errors: dict[str, list[str]] = {n: [] for n in names}
    for i in range(runs):
        for name in order_of(names, i):
            try:
                once[name]()
            except BenchError as exc:
                errors[name].append(str(exc))
    for row in rows:
        if errors.get(row.name):
            failed = f"{len(errors[row.name])} of {runs} runs failed: " if len(errors[row.name]) < runs else ""
            row.notes.setdefault(note, failed + errors[row.name][0])


@contextlib.contextmanager
def proxies(rows: list[Row], setups: dict[str, Setup], kind: str, tmp: Path, target: int, notes: tuple[str, ...],
            log: Callable[[str], None]) -> Iterator[dict[str, tuple[int, int | None]]]:
    """Every row's proxy of that kind ("tcp", "udp") to target, all up for the block: name -> (port,
    pid). A row whose proxy would not start is left out, with the reason in its notes."""
    with contextlib.ExitStack() as stack:
        up = {}
        for row in rows:
            make = getattr(setups[row.name], kind)
            if make is None:
                continue
            try:
                up[row.name] = stack.enter_context(make(tmp, target))
            except BenchError as exc:
                log(f"{row.name}: {exc}")
                for note in notes:
                    row.notes[note] = str(exc)
        yield up


def measure_rows(rows: list[Row], setups: dict[str, Setup], tmp: Path, targets: Targets, opts: Options,
                 log: Callable[[str], None]) -> None:
    """Throughput, conn/s (with CPU), keep-alive and UDP of every row, each measurement's --repeat
    runs interleaved across the rows (every row's proxy up throughout), then each daemon's ping."""
    d = opts.duration
    by = {r.name: r for r in rows}
    if targets.iperf is not None:
        with proxies(rows, setups, "tcp", tmp, targets.iperf, ("throughput",), log) as up:
            log(f"throughput: iperf3 through {', '.join(up)}, {opts.repeat} rounds")
            # iperf3 -s serves one client at a time: let the connections the readiness
            # probes opened through the proxies reach it and close.
            time.sleep(SETTLE)

            def throughput(row: Row, port: int, pid: int | None) -> Callable[[], None]:
                def once() -> None:
                    cpu = cpu_meter(pid)
                    try:
                        bps = measure_throughput(port, d)
                    except Retried as exc:
                        bps = exc.value
                        row.notes["throughput"] = f"second attempt; the first failed: {exc}"
                    row.add("bps", bps)
                    used = cpu()
                    if used is not None and bps:
                        row.add("cpu_s_per_gb", used / (bps * d / 8 / 1e9))
                return once
            interleaved(rows, "throughput", opts.repeat, {n: throughput(by[n], *pp) for n, pp in up.items()})
    if targets.nginx is not None:
        with proxies(rows, setups, "tcp", tmp, targets.nginx, ("conn/s", "keep-alive"), log) as up:
            log(f"conn/s, then keep-alive: wrk through {', '.join(up)}, {opts.repeat} rounds each")
            time.sleep(SETTLE)

            def conn_rate(row: Row, port: int, pid: int | None) -> Callable[[], None]:
                def once() -> None:
                    cpu = cpu_meter(pid)
                    w = measure_conn_rate(port, d)
                    row.add("conn_per_s", w.requests_per_sec)
                    used = cpu()
                    if used is not None and w.requests:
                        row.add("cpu_us_per_conn", used / w.requests * 1e6)
                    if w.socket_errors or w.non_2xx:
                        row.notes["conn/s"] = (f"{w.socket_errors} socket errors, "
                                               f"{w.non_2xx} non-2xx of {w.requests} requests")
                return once

            def keepalive(row: Row, port: int, pid: int | None) -> Callable[[], None]:
                def once() -> None:
                    w = measure_wrk(port, d, KEEPALIVE_CONNS, close=False)
                    row.add("keepalive_per_s", w.requests_per_sec)
                    if w.socket_errors or w.non_2xx:
                        row.notes["keep-alive"] = (f"{w.socket_errors} socket errors, "
                                                   f"{w.non_2xx} non-2xx of {w.requests} requests")
                return once
            interleaved(rows, "conn/s", opts.repeat, {n: conn_rate(by[n], *pp) for n, pp in up.items()})
            interleaved(rows, "keep-alive", opts.repeat, {n: keepalive(by[n], *pp) for n, pp in up.items()})
    if targets.udp is not None:
        with proxies(rows, setups, "udp", tmp, targets.udp, ("UDP",), log) as up:
            log(f"UDP through {', '.join(up)}, {opts.repeat} rounds")

            def udp(row: Row, port: int, pid: int | None) -> Callable[[], None]:
                def once() -> None:
                    rate, client_cpu = measure_udp(port, opts.udp_seconds)
                    row.add("udp_per_s", rate)
                    row.add("udp_client_cpu", client_cpu)
                return once
            interleaved(rows, "UDP", opts.repeat, {n: udp(by[n], *pp) for n, pp in up.items()})
    for row in rows:
        daemon = setups[row.name].daemon
        if daemon is not None and opts.ping_runs:
            log(f"{row.name}: wormhole ping x{opts.ping_runs}")
            try:
                row.ping_ms = daemon.ping(opts.ping_runs)
            except BenchError as exc:
                row.notes["ping"] = str(exc)
    for row in rows:
        for note, err in targets.errors.items():
            row.notes[note] = err
        row.settle()


# -- idle connections ----------------------------------------------------------

PAGE = os.sysconf("SC_PAGE_SIZE")


def shrink_slabs() -> None:
    """Have every slab cache give back its per-CPU caches of free objects, which /proc/slabinfo
    would count as in use (a run that reuses the objects an earlier one freed would seem to
    take no memory): writing to /sys/kernel/slab/CACHE/shrink (SLUB; root)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/sys/kernel/slab"):
            if entry.is_dir(follow_symlinks=False):  # the others are aliases of merged caches
                with contextlib.suppress(OSError), open(f"{entry.path}/shrink", "w") as f:
                    f.write("1")


def kernel_memory() -> dict[str, int]:
    """Bytes per slab cache (see parse_slabinfo), counted after shrink_slabs()."""
    shrink_slabs()
    try:
        with open("/proc/slabinfo") as f:
            return parse_slabinfo(f.read())
    except OSError as exc:
        raise BenchError(f"cannot read /proc/slabinfo: {exc.strerror} (the bench runs as root)") from None


def tcp_buffer_bytes() -> int:
    """What sockstat counts for TCP socket buffers, machine-wide. Not part of the idle figures:
    an idle connection has no byte to buffer, and this moves with any TCP traffic on the
    machine, in per-CPU batches; kept in --json to show that it stays near 0."""
    with open("/proc/net/sockstat") as f:
        return parse_sockstat_tcp_mem(f.read()) * PAGE


def process_usage(pid: int) -> tuple[int, int]:
    """RSS (KiB) and open fds of the processes of pid's process group (the proxy and any children)."""
    rss = fds = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                if proc_pgrp(f.read()) != pid:
                    continue
            with open(f"/proc/{entry.name}/status") as f:
                rss += status_rss_kib(f.read())
            # The size of /proc/PID/fd is the number of open fds (Linux >= 6.2); listing the
            # directory instead would make a /proc inode and a dentry per fd.
            fds += os.stat(f"/proc/{entry.name}/fd").st_size or len(os.listdir(f"/proc/{entry.name}/fd"))
        except (OSError, ValueError, IndexError):
            continue
    return rss, fds


@dataclasses.dataclass
class IdleSample:
    conns: int
    rss_kib: int | None  # the proxy's growth (None: no proxy process)
    fds: int | None
    kernel: dict[str, int]  # growth per slab cache, bytes
    tcp_mem: int  # growth of sockstat's TCP mem, bytes (not in the figures)
    fd_limit: int | None  # the proxy's RLIMIT_NOFILE (soft)
    fds_before: int | None

    @property
    def kernel_bytes(self) -> int:
        return sum(self.kernel.values())


def idle_once(name: str, tmp: Path, target: IdleTarget, conns: int, log: Callable[[str], None]) -> IdleSample:
    """A fresh proxy (a freed connection's memory stays in its heap, so a second run in the same
    process would measure less), CONNS connections through it held open, and the growth."""
    with setup(name, tmp) as s, s.tcp(tmp, target.port) as (port, pid):
        target.wait("the readiness probe's connection was not closed", lambda st: st["open"] == 0, 10)
        time.sleep(SETTLE)
        limit = None
        if pid:
            with open(f"/proc/{pid}/limits") as f:
                limit = parse_nofile_limit(f.read())
        rss0, fds0 = process_usage(pid) if pid else (None, None)
        kern0, tcp0 = kernel_memory(), tcp_buffer_bytes()
        status = tmp / "idle-client.status"
        status.unlink(missing_ok=True)
        argv = [sys.executable, LOADGEN, "idle-client", port, conns, status]
        with Proc("idle-client", argv, tmp) as client:
            deadline = time.monotonic() + 60
            while True:
                st, tst = read_status(status), read_status(target.status)
                if st.get("failed") or st.get("closed"):
                    raise BenchError(f"of {conns} connections, {st['failed']} failed and {st['closed']} "
                                     f"were closed (target: {tst.get('open')} open)")
                if st.get("connected") == conns and tst.get("open") == conns:
                    break
                if not client.alive():
                    raise BenchError(f"the idle client exited: {client.tail(1)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{st.get('connected', 0)} of {conns} connections made, "
                                     f"{tst.get('open')} open at the target after 60 s")
                time.sleep(0.05)
            usage = process_usage(pid) if pid else None
            for _ in range(25):  # until the proxy's fds and RSS stop moving
                time.sleep(0.2)
                now = process_usage(pid) if pid else None
                if now == usage:
                    break
                usage = now
            kern1, tcp1 = kernel_memory(), tcp_buffer_bytes()
        # The client is gone: its connections were reset, and so will the target's be.
        target.wait("the target did not see every connection closed", lambda st: st["open"] == 0, 30)
    growth = {k: kern1.get(k, 0) - kern0.get(k, 0) for k in kern0.keys() | kern1.keys()}
    return IdleSample(conns, usage[0] - rss0 if pid else None, usage[1] - fds0 if pid else None,
                      {k: v for k, v in growth.items() if v}, tcp1 - tcp0, limit, fds0)


def measure_idle(rows: list[Row], tmp: Path, target: IdleTarget, opts: Options,
                 log: Callable[[str], None]) -> None:
    """The idle columns of every row; direct first: the kernel's growth for the client's and
    the target's sockets, which the proxies' kernel figure leaves out."""
    direct_kib = None
    for row in rows:
        if row.name not in IDLE_ROWS:
            continue
        conns = opts.idle_conns
        try:
            if row.name != "direct":  # how many connections the proxy's fd limit leaves room for
                log(f"{row.name}: idle probe, {IDLE_PROBE} connections")
                probe = idle_once(row.name, tmp, target, IDLE_PROBE, log)
                per_conn = probe.fds / IDLE_PROBE
                if probe.fd_limit and per_conn > 0:
                    room = int((probe.fd_limit - probe.fds_before - 64) / per_conn)
                    if room < conns:
                        row.notes["idle"] = (f"{room} connections, not {conns}: {per_conn:.1f} fds each and "
                                             f"RLIMIT_NOFILE {probe.fd_limit}")
                        conns = room
        except BenchError as exc:
            row.notes["idle"] = str(exc)
            continue
        samples: list[IdleSample] = []

        def once() -> None:
            log(f"{row.name}: {conns} idle connections")
            samples.append(idle_once(row.name, tmp, target, conns, log))
        interleaved([row], "idle", opts.repeat, {row.name: once})  # one row: its runs in a row
        if not samples:
            continue
        row.idle_conns = conns
        kib = [s.kernel_bytes / s.conns / 1024 for s in samples]
        row.samples["idle_kernel_raw_kib"] = kib
        row.samples["idle_sockstat_tcp_mem_bytes_per_conn"] = [s.tcp_mem / s.conns for s in samples]
        if row.name == "direct":
            row.idle_kernel_kib = direct_kib = median(kib)
        elif direct_kib is not None:
            row.samples["idle_kernel_kib"] = [k - direct_kib for k in kib]
            row.idle_kernel_kib = median(row.samples["idle_kernel_kib"])
        if samples[0].rss_kib is not None:
            row.samples["idle_proc_kib"] = [s.rss_kib / s.conns for s in samples]
            row.samples["idle_fds"] = [s.fds / s.conns for s in samples]
            row.idle_proc_kib = median(row.samples["idle_proc_kib"])
            row.idle_fds = median(row.samples["idle_fds"])
        caches = {}
        for s in samples:
            for k, v in s.kernel.items():
                caches.setdefault(k, []).append(v / s.conns)
        top = sorted(caches.items(), key=lambda kv: -abs(statistics.median(kv[1])))[:12]
        row.idle_caches = {k: round(statistics.median(v), 1) for k, v in top}


def start_target(stack: contextlib.ExitStack, what: str, cm: ContextManager,
                 log: Callable[[str], None]) -> tuple[object | None, str | None]:
    try:
        return stack.enter_context(cm), None
    except BenchError as exc:
        log(f"{what}: {exc}")
        return None, f"{what}: {exc}"


def run(names: list[str], opts: Options,
        log: Callable[[str], None]) -> tuple[list[Row], list, int | None]:
    """The proxy rows, then the tunnel table's rows and the veth MTU ([], None unless selected)."""
    import tunnel  # not at the top: it imports this module

    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-"))
    rows = [Row(n) for n in names if n in ROWS]
    tunnel_rows: list = []
    veth_mtu = None
    try:
        if rows:
            with contextlib.ExitStack() as stack:
                t = Targets()
                for attr, what, cm, notes in (
                        ("iperf", "iperf3 server", iperf3_server(tmp), ("throughput",)),
                        ("nginx", "nginx", nginx_server(tmp), ("conn/s", "keep-alive")),
                        ("idle", "idle target", idle_target(tmp), ("idle",)),
                        ("udp", "UDP echo", udp_echo(tmp), ("UDP",))):
                    value, err = start_target(stack, what, cm, log)
                    setattr(t, attr, value)
                    if err:
                        t.errors.update(dict.fromkeys(notes, err))
                # Idle connections first, for every row: before any wrk run has left the
                # TIME_WAIT sockets whose freeing (60 s later) would blur the kernel's figures.
                if t.idle is not None:
                    measure_idle(rows, tmp, t.idle, opts, log)
                setups = {}  # every row's (a wormhole row: its daemon), up for all the measurements
                for row in rows:
                    try:
                        setups[row.name] = stack.enter_context(setup(row.name, tmp))
                    except BenchError as exc:
                        log(f"{row.name}: {exc}")
                        row.error = str(exc)
                measure_rows([r for r in rows if r.name in setups], setups, tmp, t, opts, log)
        if TUNNEL in names:
            tunnel_rows, veth_mtu = tunnel.run_tunnel(opts.duration, log, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, tunnel_rows, veth_mtu


# -- the cost of --metrics -------------------------------------------------------

METRICS_SCRAPE = 1.0  # seconds between GETs of /metrics during the runs, as a Prometheus would
METRICS_GOAL = 0.98  # with --metrics, a wormhole row keeps at least this share of its rates


@dataclasses.dataclass
class MetricsCost:
    """One wormhole row's daemon with --metrics (scraped) against the same without: every run's
    rate, keyed by whether --metrics was on."""

    name: str
    bps: dict[bool, list[float]] = dataclasses.field(default_factory=lambda: {False: [], True: []})
    conn_per_s: dict[bool, list[float]] = dataclasses.field(default_factory=lambda: {False: [], True: []})
    scrapes: int = 0
    scrape_errors: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    def ratio(self, key: str) -> float | None:
        runs = getattr(self, key)
        return ratio(median(runs[True]), median(runs[False]))


@contextlib.contextmanager
def scraper(url: str, every: float = METRICS_SCRAPE) -> Iterator[dict[str, int]]:
    """GET url every `every` seconds on a thread for the block's duration; yields the counts
    of scrapes that worked and failed."""
    counts = {"ok": 0, "failed": 0}
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(every):
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    r.read()
                counts["ok"] += 1
            except OSError:
                counts["failed"] += 1

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(10)


def measure_metrics_cost(names: list[str], opts: Options, log: Callable[[str], None]) -> list[MetricsCost]:
    """For each selected wormhole row: two daemons of its engine, one with --metrics scraped
    every second, one without, measured in alternation (throughput, then conn/s), so that
    drift on the machine falls on both alike."""
    costs = [MetricsCost(n) for n in names if n in ENGINES]
    if not costs:
        return []
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-metrics-"))
    try:
        with contextlib.ExitStack() as stack:
            iperf = stack.enter_context(iperf3_server(tmp))
            nginx = stack.enter_context(nginx_server(tmp))
            for cost in costs:
                try:
                    _metrics_cost_row(cost, tmp, iperf, nginx, opts, log)
                except BenchError as exc:
                    log(f"{cost.name} --metrics: {exc}")
                    cost.notes.append(str(exc))
    except BenchError as exc:  # a target did not start
        for cost in costs:
            cost.notes.append(str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return costs


def _metrics_cost_row(cost: MetricsCost, tmp: Path, iperf: int, nginx: int, opts: Options,
                      log: Callable[[str], None]) -> None:
    engine, port = ENGINES[cost.name], free_port()
    with Wormhole(tmp, engine) as plain, Wormhole(tmp, engine, ("--metrics", f"127.0.0.1:{port}")) as metered, \
            scraper(f"http://127.0.0.1:{port}/metrics") as scrapes:
        daemons = {False: plain, True: metered}
        for target, what in ((iperf, "throughput"), (nginx, "conn/s")):
            with contextlib.ExitStack() as proxies:
                ports = {on: proxies.enter_context(d.proxy(tmp, target))[0] for on, d in daemons.items()}
                time.sleep(SETTLE)  # the readiness probes' connections reach iperf3 -s and close
                log(f"{cost.name}: {what}, with and without --metrics, alternating x{opts.repeat}")
                for i in range(opts.repeat):
                    for on in ((False, True) if i % 2 == 0 else (True, False)):
                        try:
                            if target == iperf:
                                try:
                                    cost.bps[on].append(measure_throughput(ports[on], opts.duration))
                                except Retried as exc:
                                    cost.bps[on].append(exc.value)
                            else:
                                cost.conn_per_s[on].append(measure_conn_rate(ports[on], opts.duration).requests_per_sec)
                        except BenchError as exc:
                            cost.notes.append(f"{what}{' --metrics' if on else ''}: {exc}")
        cost.scrapes, cost.scrape_errors = scrapes["ok"], scrapes["failed"]
    if not cost.scrapes or cost.scrape_errors:
        cost.notes.append(f"{cost.scrape_errors} of {cost.scrapes + cost.scrape_errors} scrapes of /metrics failed")


def metrics_cost_table(costs: list[MetricsCost]) -> str:
    """The rates with --metrics against without, and the goal (>= METRICS_GOAL of them)."""
    lines = [f"the cost of --metrics: each wormhole row's daemon with --metrics, /metrics fetched every "
             f"{METRICS_SCRAPE:g} s,\nagainst one without, measured in alternation; medians; goal: "
             f"ratio >= {METRICS_GOAL}\n"]
    heads = ("throughput Gbit/s", "--metrics", "ratio", "conn/s", "--metrics", "ratio")
    widths = (18, 10, 11, 9, 10, 11)
    width = max(len("proxy"), *(len(c.name) for c in costs))
    head = " ".join(f"{h:>{w}}" for h, w in zip(heads, widths))
    lines += [f"{'proxy':<{width}}  {head}", "-" * (width + 2 + len(head))]
    notes = []
    for c in costs:
        cells = []
        for key, scale, fmt in (("bps", 1e9, "{:.2f}"), ("conn_per_s", 1, "{:.0f}")):
            without, with_ = (median(getattr(c, key)[on]) for on in (False, True))
            r = c.ratio(key)
            cells += [_fmt(None if without is None else without / scale, fmt),
                      _fmt(None if with_ is None else with_ / scale, fmt),
                      "n/a" if r is None else f"{r:.2f}" + (" ok" if round(r, 2) >= METRICS_GOAL else " MISS")]
        line = f"{c.name:<{width}}  " + " ".join(f"{t:>{w}}" for t, w in zip(cells, widths))
        for note in c.notes:
            notes.append(f"{c.name}: {note}")
            line += f" [{len(notes)}]"
        lines.append(line)
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def metrics_cost_to_json(costs: list[MetricsCost]) -> list[dict]:
    return [{"name": c.name, "scrapes": c.scrapes, "scrape_errors": c.scrape_errors, "notes": c.notes,
             **{f"{key}_{'with' if on else 'without'}_metrics": getattr(c, key)[on]
                for key in ("bps", "conn_per_s") for on in (False, True)},
             "throughput_ratio": c.ratio("bps"), "conn_ratio": c.ratio("conn_per_s")} for c in costs]


# -- the CLI's wall time ------------------------------------------------------------

CLI_COMMANDS = ("ping", "list")
CLI_RUNS = 30  # runs of each command
CLI_GOAL_MS = 50  # p50 wall time of a CLI command


@dataclasses.dataclass
class CliTimes:
    """Wall times (ms) of each CLI command, from exec to exit; or why there are none."""

    ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    error: str | None = None


def measure_cli(names: list[str], log: Callable[[str], None]) -> CliTimes | None:
    """`wormhole ping` and `wormhole list` as a shell runs them (a fresh process each, over TCP
    as by default) against a wormholed holding one wormhole, CLI_RUNS times each, alternating.
    None unless a wormhole row is selected."""
    if not any(n in ENGINES for n in names):
        return None
    times = CliTimes({c: [] for c in CLI_COMMANDS})
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-cli-"))
    try:
        with Wormhole(tmp) as daemon:
            res = daemon.cli("create", "url", f"127.0.0.1:{free_port()}", "tail", "url", f"127.0.0.1:{free_port()}")
            if res.returncode != 0:
                raise BenchError(f"wormhole create failed: {(res.stderr or res.stdout).strip()[-200:]}")
            log(f"CLI: wall time of {' and '.join(CLI_COMMANDS)} x{CLI_RUNS}")
            for _ in range(CLI_RUNS):
                for command in CLI_COMMANDS:
                    start = time.perf_counter()
                    res = daemon.cli(command, tcp=True)
                    elapsed = (time.perf_counter() - start) * 1000
                    if res.returncode != 0:
                        raise BenchError(f"wormhole {command} failed: {(res.stderr or res.stdout).strip()[-200:]}")
                    times.ms[command].append(elapsed)
    except BenchError as exc:
        log(f"CLI: {exc}")
        times.error = str(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def cli_table(times: CliTimes) -> str:
    """p50 and p95 of each command's wall time, and the goal (p50 <= CLI_GOAL_MS)."""
    lines = [f"the CLI: wall time of `wormhole COMMAND` from exec to exit, a fresh process each, over TCP to "
             f"a wormholed\nwith one wormhole, {CLI_RUNS} runs each; goal: p50 <= {CLI_GOAL_MS} ms\n",
             f"{'command':<8}  {'p50 ms':>7} {'p95 ms':>7} {'goal':>5}", "-" * 31]
    for command, ms in times.ms.items():
        p50, p95 = (percentile(ms, p) if ms else None for p in (50, 95))
        goal = "n/a" if p50 is None else "ok" if round(p50, 1) <= CLI_GOAL_MS else "MISS"
        lines.append(f"{command:<8}  {_fmt(p50, '{:.1f}'):>7} {_fmt(p95, '{:.1f}'):>7} {goal:>5}")
    if times.error:
        lines[-1] += " [1]"
        lines.append(f"[1] {times.error}")
    return "\n".join(lines)


def cli_to_json(times: CliTimes) -> dict:
    return {"runs_ms": times.ms, "error": times.error,
            **{f"{c}_p{p}_ms": percentile(ms, p) if ms else None for c, ms in times.ms.items() for p in (50, 95)}}


# -- handover: the pause a connection sees, and how long a takeover takes -------------------

HANDOVER_TAKEOVERS = 5  # takeovers during the stream
HANDOVER_EVERY = 2.0  # seconds between them (and after the last)
HANDOVER_BASELINE = 3.0  # seconds of stream before the first: the baseline gaps
STREAM_INTERVAL = 0.001  # seconds between the stream's messages
STREAM_MESSAGE = struct.Struct("!Qd")  # a message: its sequence number, when it was sent (time.monotonic())
HANDOVER_COUNTS = (1, 100, 5000)  # established idle connections through the timed takeovers
HANDOVER_RUNS = 3  # timed takeovers per count
HANDOVER_FDS = {"native": 2, "python": 6}  # the daemon's fds per idle connection (the idle table)
CONNECT_BATCH = 100  # connections opened at once (wormholed listens with a backlog of 128)
PAUSE_SLACK = 1.0  # seconds after the ping's answer within which a takeover's pause must end
TIMED_SETTLE = 0.5  # seconds after each timed takeover, before the next
LINGER0 = struct.pack("ii", 1, 0)  # close with a reset: no TIME_WAIT left behind


def echo_gaps(arrivals: list[float]) -> list[float]:
    """Milliseconds between consecutive echoes (their times in seconds, in the order they came)."""
    return [(b - a) * 1000 for a, b in zip(arrivals, arrivals[1:])]


@dataclasses.dataclass(frozen=True)
class GapStats:
    max_ms: float
    p99_ms: float
    echoes: int


def gap_stats(arrivals: list[float]) -> GapStats | None:
    """The longest and the p99 (nearest rank) gap between consecutive echoes; None under 2 echoes."""
    gaps = echo_gaps(arrivals)
    return GapStats(max(gaps), percentile(gaps, 99), len(arrivals)) if gaps else None


def split_gaps(arrivals: list[float], mark: float | None) -> tuple[GapStats | None, GapStats | None]:
    """The gaps before MARK (the baseline) and from it on (a gap that spans it is the second's);
    no mark: all of them are the baseline."""
    if mark is None:
        return gap_stats(arrivals), None
    k = bisect.bisect_left(arrivals, mark)
    return gap_stats(arrivals[:k]), gap_stats(arrivals[max(k - 1, 0):])


def pause_windows(takeovers: list[Takeover], slack: float | None = None) -> list[tuple[float, float]]:
    """Where each takeover's pause can end: from its start until SLACK s after the new daemon
    answered the ping (it answers before it has taken every connection back), or until the
    next takeover's start."""
    slack = PAUSE_SLACK if slack is None else slack
    out = []
    for i, t in enumerate(takeovers):
        end = t.started + t.seconds + slack
        if i + 1 < len(takeovers):
            end = min(end, takeovers[i + 1].started)
        out.append((t.started, end))
    return out


def pauses(arrivals: list[float], windows: list[tuple[float, float]]) -> list[float | None]:
    """The longest gap (ms) between consecutive echoes that ends in each window [start, end):
    the pause each takeover caused (None: no echo came in it)."""
    out: list[float | None] = []
    for start, end in windows:
        lo, hi = max(bisect.bisect_left(arrivals, start), 1), bisect.bisect_left(arrivals, end)
        gaps = [(arrivals[j] - arrivals[j - 1]) * 1000 for j in range(lo, hi)]
        out.append(max(gaps) if gaps else None)
    return out


def sequence_faults(seqs: list[int], sent: int) -> tuple[int, int]:
    """(lost, out of order) among the echoes' sequence numbers, of SENT messages numbered from 0:
    lost, sent and never echoed; out of order, an echo numbered at or below the one before it
    (a duplicate, or overtaken) or never sent."""
    lost = sent - len(set(seqs).intersection(range(sent)))
    disorder = sum(1 for i, s in enumerate(seqs) if s >= sent or (i and s <= seqs[i - 1]))
    return lost, disorder


def handover_log(lines: list[tuple[float, str]]) -> tuple[float | None, int | None]:
    """From the old daemon's timed log lines: the seconds between its "handover: pid N takes
    over" and "handover: pid N took over M fds; exiting", and M."""
    takes = next((t for t, line in lines if re.search(r"handover: pid \S+ takes over", line)), None)
    for t, line in lines:
        m = re.search(r"handover: pid \S+ took over ([0-9]+) fds", line)
        if m:
            return (None if takes is None else t - takes), int(m.group(1))
    return None, None


@dataclasses.dataclass
class Takeover:
    seconds: float  # from starting wormholed --takeover until the old one exited and the new one answered a ping
    exit_s: float  # until the old daemon exited
    old_log_s: float | None  # between the old daemon's "takes over" and "took over N fds", as they came
    fds: int | None  # the fds it handed over (its log)
    started: float  # time.monotonic() when wormholed --takeover started


@dataclasses.dataclass
class PauseRun:
    """One engine's stream through takeovers."""

    name: str  # the row: wormhole, wormhole-python
    baseline: GapStats | None = None
    during: GapStats | None = None
    pauses_ms: list[float | None] = dataclasses.field(default_factory=list)  # the longest gap after each takeover
    sent: int = 0
    echoed: int = 0
    lost: int | None = None
    out_of_order: int | None = None
    rtt_max_ms: float | None = None  # the longest a message waited for its echo
    takeovers: list[Takeover] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class HandoverCount:
    """Takeovers timed with COUNT idle connections held through the wormhole."""

    count: int  # connections asked for
    conns: int = 0  # held (fewer than count where RLIMIT_NOFILE leaves no room: note)
    takeovers: list[Takeover] = dataclasses.field(default_factory=list)
    pauses_ms: list[float | None] = dataclasses.field(default_factory=list)  # the stream's, in each takeover
    echoed: int | None = None  # of conns, how many echoed after the takeovers
    note: str | None = None


@dataclasses.dataclass
class HandoverResult:
    pauses: list[PauseRun]
    engine: str  # the WORMHOLE_ENGINE of the timed takeovers
    counts: list[HandoverCount]
    takeovers: int = HANDOVER_TAKEOVERS  # during each stream
    every: float = HANDOVER_EVERY
    baseline: float = HANDOVER_BASELINE
    interval: float = STREAM_INTERVAL
    runs: int = HANDOVER_RUNS  # timed takeovers per count
    stream: PauseRun | None = None  # the stream beside the held connections through the timed takeovers
    error: str | None = None  # nothing measured (the echo server did not start)


@contextlib.contextmanager
def echo_target(tmp: Path) -> Iterator[int]:
    port = free_port()
    with Proc("echo-server", [sys.executable, LOADGEN, "echo-server", port], tmp) as p:
        wait_listening(port, p)
        yield port


def connect_held(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def echo_check(socks: list[socket.socket], timeout: float = 15.0) -> int:
    """Send 8 bytes on each connection and wait for each to come back: how many did not."""
    payload = b"echo me!"
    ep = select.epoll()
    waiting: dict[int, tuple[socket.socket, bytes]] = {}
    ok = 0
    try:
        for s in socks:
            try:
                s.sendall(payload)
            except OSError:
                continue
            ep.register(s.fileno(), select.EPOLLIN)
            waiting[s.fileno()] = (s, b"")
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for fd, _ in ep.poll(max(deadline - time.monotonic(), 0.001)):
                s, got = waiting[fd]
                try:
                    data = s.recv(64)
                except OSError:
                    data = b""
                got += data
                if not data or len(got) >= len(payload):
                    ok += got == payload
                    ep.unregister(fd)
                    del waiting[fd]
                else:
                    waiting[fd] = (s, got)
    finally:
        ep.close()
    return len(socks) - ok


class EchoStream:
    """A client of the echo server: one thread sends a STREAM_MESSAGE every `interval`, on
    schedule, another times each echo as it comes back."""

    def __init__(self, port: int, interval: float = STREAM_INTERVAL):
        self.sock = connect_held(port)
        self.sock.settimeout(None)
        self.interval = interval
        self.sent = 0
        self.seqs: list[int] = []
        self.arrivals: list[float] = []  # time.monotonic() of each echo
        self.rtt_max = 0.0
        self.error: str | None = None
        self._stop = threading.Event()
        self._closing = False
        self._sender = threading.Thread(target=self._send, daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)

    def __enter__(self) -> "EchoStream":
        self._receiver.start()
        self._sender.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish(0)

    def _send(self) -> None:
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                wait = start + self.sent * self.interval - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.sock.sendall(STREAM_MESSAGE.pack(self.sent, time.monotonic()))
                self.sent += 1
        except OSError as exc:
            self.error = self.error or f"send: {exc}"

    def _receive(self) -> None:
        size, buf = STREAM_MESSAGE.size, b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                now = time.monotonic()
                if not data:
                    if not self._closing:
                        self.error = self.error or "the connection was closed"
                    return
                buf += data
                n = len(buf) // size
                for i in range(n):
                    seq, at = STREAM_MESSAGE.unpack_from(buf, i * size)
                    self.seqs.append(seq)
                    self.arrivals.append(now)
                    self.rtt_max = max(self.rtt_max, now - at)
                buf = buf[n * size:]
        except OSError as exc:
            if not self._closing:
                self.error = self.error or f"recv: {exc}"

    def finish(self, timeout: float = 5.0) -> None:
        """Stop sending, wait (at most TIMEOUT s) for the echoes of all that was sent, close."""
        self._stop.set()
        if self._sender.is_alive():
            self._sender.join()
        deadline = time.monotonic() + timeout
        while len(self.seqs) < self.sent and self._receiver.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._receiver.is_alive():
            self._receiver.join(5)
        self.sock.close()


def pinger(daemon: Wormhole, timeout: float = 30.0) -> Callable[[], None]:
    """`wormhole ping` made in this process (no process start in the figure): one call on a
    fresh TLS-PSK connection to the daemon's unix socket. A connection made while no daemon
    serves the socket waits in its backlog until one does."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    from wormhole.addr import Address
    from wormhole.client import call_once
    from wormhole.keys import client_context, load_key

    key = load_key(str(daemon.key))
    ctx, addr = client_context(key), Address("unix", path=str(daemon.sock))

    def ping() -> None:
        try:
            call_once(addr, key, "ping", ctx=ctx, timeout=timeout)
        except Exception as exc:  # RpcError, Failed
            raise BenchError(f"no answer to ping after the takeover: {exc}") from None
    return ping


def take_over(daemon: Wormhole, ping: Callable[[], None], timeout: float = 30.0) -> Takeover:
    """Start `wormholed --takeover` with the daemon's flags and state dir; the time until the old
    one exited (0) and the new one answered a ping. daemon.proc is the new one after; the old
    one, where the takeover failed."""
    old = daemon.proc
    old_fd = os.pidfd_open(old.popen.pid)
    new = None
    try:
        start = time.monotonic()
        new = daemon.spawn("--takeover")
        new_fd = os.pidfd_open(new.popen.pid)
        try:
            poller = select.poll()  # not select(): the fds of held connections pass 1024
            for fd in (old_fd, new_fd):
                poller.register(fd, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(timeout * 1000)}
        finally:
            os.close(new_fd)
        exited = time.monotonic()
        if old_fd not in ready:
            raise BenchError((f"wormholed --takeover exited with {new.popen.wait()}" if ready else
                              f"the old wormholed did not exit within {timeout:.0f} s of wormholed --takeover")
                             + f": {new.tail(1)}")
    except BaseException:
        if new is not None:
            new.stop()  # the old one, if it serves on, is still daemon.proc
        raise
    finally:
        os.close(old_fd)
    daemon.proc = new
    code = old.popen.wait()
    if code != 0:
        raise BenchError(f"the old wormholed exited with {code}: {old.tail(1)}")
    ping()
    answered = time.monotonic()
    reader = getattr(old, "reader", None)
    if reader is not None:
        reader.join(5)  # its pipe closed at its exit
    old_log_s, fds = handover_log(getattr(old, "lines", []))
    old.stop()  # stragglers of its group (none)
    return Takeover(answered - start, exited - start, old_log_s, fds, start)


def _pause_run(pr: PauseRun, h: HandoverResult, tmp: Path, echo: int, log: Callable[[str], None]) -> None:
    with Wormhole(tmp, ENGINES[pr.name], stamped=True) as daemon, daemon.proxy(tmp, echo) as (port, _):
        ping = pinger(daemon)
        log(f"{pr.name}: a message every {h.interval * 1000:g} ms, {h.baseline:g} s alone, then "
            f"{h.takeovers} takeovers {h.every:g} s apart")
        with EchoStream(port, h.interval) as stream:
            try:
                time.sleep(h.baseline)
                for _ in range(h.takeovers):
                    pr.takeovers.append(take_over(daemon, ping))
                    time.sleep(h.every)
                    if stream.error:
                        break
            except BenchError as exc:  # the figures of the stream so far stand, with the error
                pr.error = str(exc)
            finally:
                stream.finish()
        stream_figures(pr, stream)


def stream_figures(pr: PauseRun, stream: EchoStream) -> None:
    """A finished stream's gaps, pauses (pr.takeovers made meanwhile) and sequence numbers; its
    error, if any, in pr.error."""
    pr.baseline, pr.during = split_gaps(stream.arrivals, pr.takeovers[0].started if pr.takeovers else None)
    pr.pauses_ms = pauses(stream.arrivals, pause_windows(pr.takeovers))
    pr.sent, pr.echoed = stream.sent, len(stream.seqs)
    pr.lost, pr.out_of_order = sequence_faults(stream.seqs, stream.sent)
    pr.rtt_max_ms = stream.rtt_max * 1000
    if stream.error:
        pr.error = pr.error or f"the stream: {stream.error}"


def handover_room(engine: str) -> int:
    """The connections RLIMIT_NOFILE leaves room for: in the daemon (HANDOVER_FDS each, its hard
    limit: it raises its soft one to it), in this process and in the echo server (1 each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, min((hard - 256) // HANDOVER_FDS[engine], soft - 256))


def _handover_times(h: HandoverResult, tmp: Path, echo: int, log: Callable[[str], None]) -> None:
    room = handover_room(h.engine)
    for c in h.counts:
        c.conns = min(c.count, room)
        if c.conns < c.count:
            c.note = (f"{c.conns} connections, not {c.count}: {HANDOVER_FDS[h.engine]} fds each in the daemon "
                      f"and RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}")
    socks: list[socket.socket] = []
    h.stream = pr = PauseRun(f"{h.engine} engine, timed")
    try:
        with Wormhole(tmp, h.engine, stamped=True) as daemon, daemon.proxy(tmp, echo) as (port, _), \
                EchoStream(port, h.interval) as stream:
            ping = pinger(daemon)
            for i, c in enumerate(h.counts):
                try:
                    log(f"handover: {c.conns} connection(s), {h.runs} timed takeovers")
                    while len(socks) < c.conns:
                        batch = []
                        try:
                            for _ in range(min(CONNECT_BATCH, c.conns - len(socks))):
                                batch.append(connect_held(port))
                        finally:
                            socks += batch
                        failed = echo_check(batch)
                        if failed:
                            raise BenchError(f"{failed} of {len(batch)} new connections did not echo")
                    for _ in range(h.runs):
                        c.takeovers.append(take_over(daemon, ping))
                        pr.takeovers.append(c.takeovers[-1])
                        time.sleep(TIMED_SETTLE)
                    c.echoed = len(socks) - echo_check(socks)
                except (BenchError, OSError) as exc:
                    log(f"handover: {exc}")
                    c.note = str(exc)
                    for rest in h.counts[i + 1:]:
                        rest.note = f"not measured: {exc}"
                    break
            stream.finish()
        stream_figures(pr, stream)
        done = 0
        for c in h.counts:
            c.pauses_ms = pr.pauses_ms[done:done + len(c.takeovers)]
            done += len(c.takeovers)
    finally:
        for s in socks:
            s.close()


def measure_handover(names: list[str], log: Callable[[str], None], *, takeovers: int = HANDOVER_TAKEOVERS,
                     every: float = HANDOVER_EVERY, baseline: float = HANDOVER_BASELINE,
                     counts: tuple[int, ...] = HANDOVER_COUNTS, runs: int = HANDOVER_RUNS) -> HandoverResult | None:
    """For each selected wormhole row, a steady stream's gaps through TAKEOVERS takeovers; then the
    time of a takeover with each of COUNTS idle connections held (the native engine's daemon, or
    the Python relay's when only wormhole-python is selected). None unless a wormhole row is."""
    engines = [n for n in names if n in ENGINES]
    if not engines:
        return None
    timed = ENGINES["wormhole" if "wormhole" in engines else engines[0]]
    h = HandoverResult([PauseRun(n) for n in engines], timed, [HandoverCount(c) for c in counts],
                       takeovers, every, baseline, STREAM_INTERVAL, runs)
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-handover-"))
    try:
        with echo_target(tmp) as echo:
            for pr in h.pauses:
                try:
                    _pause_run(pr, h, tmp, echo, log)
                except BenchError as exc:
                    log(f"{pr.name} handover: {exc}")
                    pr.error = str(exc)
            if counts:
                _handover_times(h, tmp, echo, log)
    except BenchError as exc:  # the echo server or the daemon did not start
        log(f"handover: {exc}")
        h.error = str(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return h


def _ms(values: list[float | None], how: Callable[[list[float]], float] = statistics.median) -> float | None:
    known = [v for v in values if v is not None]
    return how(known) * 1000 if known else None


def handover_table(h: HandoverResult) -> str:
    """The pause of a stream through takeovers, per engine; the time of a takeover, per count."""
    lines = [f"handover: `wormholed --takeover` (the daemon's flags and --state-dir) while a client sends a "
             f"{STREAM_MESSAGE.size}-byte message\nevery {h.interval * 1000:g} ms through a wormhole to an echo "
             f"server: {h.baseline:g} s alone (baseline), then {h.takeovers} takeovers {h.every:g} s apart;\n"
             f"gap: between consecutive echoes; pause: the longest gap after each takeover; lost and out of order: "
             f"by sequence number\n"]
    if h.error:
        return "\n".join(lines + [f"n/a ({h.error})"])
    width = max([len("engine")] + [len(p.name) for p in h.pauses])
    heads = ("max gap ms", "p99 ms", "max gap ms", "p99 ms", "sent", "lost", "out of order")
    widths = (10, 7, 12, 7, 7, 5, 13)
    head = " ".join(f"{t:>{w}}" for t, w in zip(heads, widths)) + "  pause per takeover ms"
    groups = f"{'baseline':^18} {f'with {h.takeovers} takeovers':^20}"
    rows = []
    for p in h.pauses:
        if p.error and p.baseline is None:
            rows.append(f"{p.name:<{width}}  n/a ({p.error})")
            continue
        cells = [_fmt(g and getattr(g, a), "{:.1f}") for g in (p.baseline, p.during) for a in ("max_ms", "p99_ms")]
        cells += [str(p.sent), _fmt(p.lost, "{}"), _fmt(p.out_of_order, "{}")]
        line = (f"{p.name:<{width}}  " + " ".join(f"{t:>{w}}" for t, w in zip(cells, widths)) + "  "
                + (" ".join(_fmt(x, "{:.0f}") for x in p.pauses_ms) or "-"))
        rows.append(line + (f"  ({p.error})" if p.error else ""))
    lines += [f"{'':<{width}}  {groups}".rstrip(), f"{'engine':<{width}}  {head}", "-" * (width + 2 + len(head)), *rows]
    if not h.counts:
        return "\n".join(lines)
    lines += ["", f"takeover time: from starting `wormholed --takeover` until the old daemon exited and the new "
                  f"one answered a ping, with N\nestablished idle connections through one wormhole ({h.engine} "
                  f"engine) beside a stream as above, {h.runs} takeovers each; medians and max;\nold's log: "
                  f"between the old daemon's lines \"takes over\" and \"took over M fds\" (M: fds); pause: the "
                  f"stream's longest gap;\necho: the connections that echoed after the takeovers\n"]
    heads = ("takeover ms", "max ms", "old exited ms", "old's log ms", "pause ms", "max ms", "fds", "echo")
    widths = (11, 7, 13, 12, 8, 7, 6, 11)
    head = "  ".join(f"{t:>{w}}" for t, w in zip(heads, widths))
    lines += [f"{'N':>6}  {head}", "-" * (8 + len(head))]
    notes = []
    for c in h.counts:
        t = c.takeovers
        fds = [x.fds for x in t if x.fds is not None]
        cells = [_fmt(_ms([x.seconds for x in t]), "{:.0f}"), _fmt(_ms([x.seconds for x in t], max), "{:.0f}"),
                 _fmt(_ms([x.exit_s for x in t]), "{:.0f}"), _fmt(_ms([x.old_log_s for x in t]), "{:.1f}"),
                 _fmt(median([x for x in c.pauses_ms if x is not None]), "{:.0f}"),
                 _fmt(max([x for x in c.pauses_ms if x is not None], default=None), "{:.0f}"),
                 _fmt(median(fds), "{:.0f}"), "-" if c.echoed is None else f"{c.echoed}/{c.conns}"]
        line = f"{c.count:>6}  " + "  ".join(f"{x:>{w}}" for x, w in zip(cells, widths))
        if c.note:
            notes.append(c.note)
            line += f" [{len(notes)}]"
        lines.append(line)
    if h.stream is not None:
        st = h.stream
        line = (f"the stream: {st.sent} messages sent, {_fmt(st.lost, '{}')} lost, {_fmt(st.out_of_order, '{}')} "
                f"out of order; its longest gap {_fmt(st.during and st.during.max_ms, '{:.0f}')} ms")
        if st.error:
            notes.append(f"the stream: {st.error}")
            line += f" [{len(notes)}]"
        lines.append(line)
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def handover_to_json(h: HandoverResult) -> dict:
    def takeovers(t: list[Takeover]) -> dict:
        return {"takeover_s": [x.seconds for x in t], "old_exit_s": [x.exit_s for x in t],
                "old_log_s": [x.old_log_s for x in t], "fds": [x.fds for x in t]}

    def gaps(prefix: str, g: GapStats | None) -> dict:
        return {f"{prefix}gap_max_ms": g and g.max_ms, f"{prefix}gap_p99_ms": g and g.p99_ms}

    def stream(p: PauseRun) -> dict:
        return {"name": p.name, **gaps("baseline_", p.baseline), **gaps("", p.during), "pauses_ms": p.pauses_ms,
                "sent": p.sent, "echoed": p.echoed, "lost": p.lost, "out_of_order": p.out_of_order,
                "rtt_max_ms": p.rtt_max_ms, **takeovers(p.takeovers), "error": p.error}

    return {
        "interval_ms": h.interval * 1000, "baseline_s": h.baseline, "takeovers": h.takeovers, "every_s": h.every,
        "error": h.error, "pause": [stream(p) for p in h.pauses],
        "engine": h.engine, "runs": h.runs,
        "times": [{"connections_asked": c.count, "connections": c.conns, "echoed_after": c.echoed,
                   "takeover_p50_s": median([x.seconds for x in c.takeovers]), "pauses_ms": c.pauses_ms,
                   **takeovers(c.takeovers), "note": c.note} for c in h.counts],
        "times_stream": stream(h.stream) if h.stream else None,
    }


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every finally/with like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    import sidebyside  # not at the top: these import this module
    import tunnel

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds per measurement (iperf3 -t, wrk -d); default 5")
    ap.add_argument("--repeat", type=int, default=REPEAT,
                    help=f"runs per rate and per idle-connection figure, the median shown; default {REPEAT}")
    ap.add_argument("--idle-conns", type=int, default=IDLE_CONNS, metavar="N",
                    help=f"connections held for the idle columns; default {IDLE_CONNS}")
    ap.add_argument("--only", metavar="NAMES",
                    help=f"comma-separated rows to run among {', '.join(NAMES)} "
                         "(direct runs with any proxy row: it is the anchor of their ratios; "
                         "tunnel is the tunnel table)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)
    try:
        names = parse_only(args.only)
    except ValueError as exc:
        ap.error(str(exc))
    if args.duration <= 0:
        ap.error("--duration must be positive")
    if args.repeat < 1 or args.idle_conns < 1:
        ap.error("--repeat and --idle-conns must be positive")
    missing = [t for t in required_tools(names, tunnel.TOOLS) if not shutil.which(t)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run `make bench`, "
              "which installs them)", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _sigterm)
    nofile = raise_nofile()
    opts = Options(args.duration, args.repeat, args.idle_conns)
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    nproc = len(os.sched_getaffinity(0))
    t0 = time.monotonic()
    log = (lambda msg: print(f"# [{time.monotonic() - t0:4.0f} s] {msg}", file=sys.stderr, flush=True))
    try:
        rows, tunnel_rows, veth_mtu = run(names, opts, log)
        side = sidebyside.measure(names, opts.duration, log)
        costs = measure_metrics_cost(names, opts, log)
        cli_times = measure_cli(names, log)
        handover = measure_handover(names, log)
    except KeyboardInterrupt:
        print("bench: interrupted; every process stopped", file=sys.stderr)
        return 130
    took = time.monotonic() - t0

    meta = {"date": started.isoformat(timespec="seconds"), "nproc": nproc,
            "kernel": platform.release(), "duration_s": args.duration, "repeat": args.repeat,
            "idle_connections": args.idle_conns, "rlimit_nofile": nofile, "seconds": round(took)}
    if args.json:
        if side:
            meta["keepalive_side_by_side"] = sidebyside.to_json(side)
        if costs:
            meta["metrics_cost"] = metrics_cost_to_json(costs)
        if cli_times:
            meta["cli"] = cli_to_json(cli_times)
        if handover:
            meta["handover"] = handover_to_json(handover)
        print(rows_to_json(rows, meta, tunnel.tunnel_to_json(tunnel_rows) if tunnel_rows else None))
    else:
        header = (f"wormhole bench  {started:%Y-%m-%d %H:%M:%S %Z}  nproc {nproc}  "
                  f"kernel {platform.release()}  {args.duration:g} s per measurement, median of "
                  f"{args.repeat}  RLIMIT_NOFILE {nofile}  took {took:.0f} s\n")
        tables = []
        if rows:
            tables.append(format_table(rows))
        if side:
            tables.append(sidebyside.table(side, args.duration))
        if costs:
            tables.append(metrics_cost_table(costs))
        if cli_times:
            tables.append(cli_table(cli_times))
        if handover:
            tables.append(handover_table(handover))
        if tunnel_rows:
            tables.append(tunnel.format_tunnel_table(
                tunnel_rows, tunnel.tunnel_header(args.duration, veth_mtu)))
        print(header + "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    # Run as the module `run`, the one bench/tunnel.py imports: one BenchError class.
    import run
    sys.exit(run.main())
