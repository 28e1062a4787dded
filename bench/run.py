#!/usr/bin/env python3
"""Side-by-side benchmark of wormhole against other TCP proxies on loopback.

Two measurements, each taken directly and through every proxy:

* single-stream TCP throughput: iperf3 client -> [proxy] -> iperf3 server;
* new connections per second: wrk with ``Connection: close`` (one TCP
  connection per request) -> [proxy] -> nginx returning a 2-byte body.

Then the tunnel table (bench/tunnel.py): iperf3 through a WireGuard tunnel between
two network namespaces, built by ``wormhole tunnel-create`` and built by hand.

Usage: bench/run.py [--duration S] [--only NAMES] [--json]

Every process started here runs in its own process group and is killed when
its ``with`` block ends (normally, on error, on Ctrl-C or on SIGTERM); the
temporary directory (configs, logs, the wormhole key and state) is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, ContextManager, Iterator

ROOT = Path(__file__).resolve().parent.parent
# Where wormhole and wormholed are; WORMHOLE_BENCH_BIN=DIR benches another build.
WORMHOLE_BIN = Path(os.environ.get("WORMHOLE_BENCH_BIN") or ROOT / ".venv" / "bin")
PROXYD = "/lib/systemd/systemd-socket-proxyd"
SETTLE = 0.5  # seconds between a listener's readiness and its measurement
ROWS = ("direct", "wormhole", "systemd-socket-proxyd", "haproxy", "socat")
TUNNEL = "tunnel"  # the tunnel table (bench/tunnel.py), after the proxy rows
NAMES = ROWS + (TUNNEL,)
PROXY_TOOLS = ("iperf3", "wrk", "nginx", "haproxy", "socat", "systemd-socket-activate")


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


@dataclasses.dataclass
class Row:
    name: str
    bps: float | None = None  # iperf3 throughput, bits/s
    conn_per_s: float | None = None  # wrk requests/s with one connection each
    cpu_s_per_gb: float | None = None  # the proxy's CPU seconds per GB relayed (iperf3)
    cpu_us_per_conn: float | None = None  # the proxy's CPU microseconds per connection (wrk)
    error: str | None = None  # whole row unavailable (e.g. daemon did not start)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # per column


def _ratio(value: float | None, anchor: float | None) -> str:
    if value is None or not anchor:
        return "n/a"
    return f"{value / anchor:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def proc_cpu_seconds(stat: str, ticks: int) -> float:
    """utime+stime+cutime+cstime from a /proc/PID/stat line (children: socat's forks)."""
    fields = stat.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / ticks


def format_table(rows: list[Row], header: str = "") -> str:
    """The side-by-side table; ratios are against the 'direct' row."""
    direct = next((r for r in rows if r.name == "direct"), None)
    anchor_bps = direct.bps if direct and not direct.error else None
    anchor_cps = direct.conn_per_s if direct and not direct.error else None
    width = max([len("proxy")] + [len(r.name) for r in rows])
    cols = (f"{'throughput Gbit/s':>18} {'ratio':>6} {'conn/s':>9} {'ratio':>6}"
            f" {'CPU s/GB':>9} {'CPU us/conn':>12}")
    lines = [header] if header else []
    lines.append(f"{'proxy':<{width}}  {cols}")
    lines.append("-" * (width + 2 + len(cols)))
    footnotes: list[str] = []
    for row in rows:
        if row.error:
            lines.append(f"{row.name:<{width}}  n/a ({row.error})")
            continue
        cells = []
        for key, value, anchor, fmt, w in (
            ("throughput", row.bps and row.bps / 1e9, anchor_bps and anchor_bps / 1e9, "{:.2f}", 18),
            ("conn/s", row.conn_per_s, anchor_cps, "{:.0f}", 9),
        ):
            if value is None:
                text = "n/a"
            else:
                text = fmt.format(value)
            if key in row.notes:
                footnotes.append(f"{row.name} {key}: {row.notes[key]}")
                text += f" [{len(footnotes)}]"
            cells.append(f"{text:>{w}} {_ratio(value, anchor):>6}")
        cpu = (f"{_num(row.cpu_s_per_gb, '{:.3f}'):>9} {_num(row.cpu_us_per_conn, '{:.0f}'):>12}")
        lines.append(f"{row.name:<{width}}  {cells[0]} {cells[1]} {cpu}")
    for i, note in enumerate(footnotes, 1):
        lines.append(f"[{i}] {note}")
    return "\n".join(lines)


def rows_to_json(rows: list[Row], meta: dict, tunnel: dict | None = None) -> str:
    direct = next((r for r in rows if r.name == "direct" and not r.error), None)
    out = []
    for r in rows:
        out.append({
            "name": r.name,
            "throughput_bps": r.bps,
            "throughput_ratio": r.bps / direct.bps if direct and direct.bps and r.bps is not None else None,
            "conn_per_s": r.conn_per_s,
            "conn_ratio": (r.conn_per_s / direct.conn_per_s
                           if direct and direct.conn_per_s and r.conn_per_s is not None else None),
            "cpu_s_per_gb": r.cpu_s_per_gb,
            "cpu_us_per_conn": r.cpu_us_per_conn,
            "error": r.error,
            "notes": r.notes,
        })
    doc = {**meta, "rows": out}
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
    """

    def __init__(self, name: str, argv: list[str], logdir: Path):
        self.name, self.argv = name, [str(a) for a in argv]
        self.log = logdir / f"{name}.log"
        self.popen: subprocess.Popen | None = None

    def __enter__(self) -> "Proc":
        with open(self.log, "ab") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # own group: Ctrl-C reaches us, we stop it
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


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client tool in the foreground (killed by subprocess.run on Ctrl-C/timeout)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from None


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


def measure_conn_rate(port: int, duration: float) -> WrkResult:
    argv = ["wrk", "-t1", "-c50", f"-d{duration:g}s", "-H", "Connection: close",
            f"http://127.0.0.1:{port}/"]
    res = run_tool(argv, timeout=duration + 30)
    if res.returncode != 0:
        out = (res.stderr.strip() or res.stdout.strip())[-200:]
        raise BenchError(f"wrk exited with {res.returncode}: {out}")
    result = parse_wrk(res.stdout)
    if not result.requests_per_sec:
        raise BenchError(f"no request completed ({result.socket_errors} socket errors)")
    return result


# --------------------------------------------------------------------------
# Proxies: each is a context manager (tmp, target_port) -> listening port


@contextlib.contextmanager
def direct(tmp: Path, target: int) -> Iterator[tuple[int, int | None]]:
    yield target, None


@contextlib.contextmanager
def socket_proxyd(tmp: Path, target: int) -> Iterator[int]:
    port = free_port()
    argv = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", PROXYD, f"127.0.0.1:{target}"]
    with Proc(f"socket-proxyd-{target}", argv, tmp) as p:
        wait_listening(port, p)
        yield port, p.popen.pid


HAPROXY_CFG = """\
global
    maxconn 8000
    # One thread, like the other proxies here (socat forks, proxyd and the
    # wormhole daemon are single-threaded); HAProxy would otherwise use every CPU.
    nbthread 1
defaults
    mode tcp
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
def haproxy(tmp: Path, target: int) -> Iterator[int]:
    port = free_port()
    cfg = tmp / f"haproxy-{target}.cfg"
    cfg.write_text(HAPROXY_CFG.format(port=port, target=target))
    with Proc(f"haproxy-{target}", ["haproxy", "-f", cfg, "-db"], tmp) as p:
        wait_listening(port, p)
        yield port, p.popen.pid


@contextlib.contextmanager
def socat(tmp: Path, target: int) -> Iterator[int]:
    port = free_port()
    argv = ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1", f"TCP:127.0.0.1:{target}"]
    with Proc(f"socat-{target}", argv, tmp) as p:
        wait_listening(port, p)
        yield port, p.popen.pid


class Wormhole:
    """A wormholed for the wormhole row, driven through the wormhole CLI."""

    def __init__(self, tmp: Path):
        self.tmp = tmp / "wormhole"
        self.tmp.mkdir()
        self.key = self.tmp / "key.secret"
        self.sock = self.tmp / "ctl.sock"
        self.proc: Proc | None = None

    def cli(self, *args: str, timeout: float = 15) -> subprocess.CompletedProcess:
        argv = [str(WORMHOLE_BIN / "wormhole"), "-H", f"unix://{self.sock}", "-K", str(self.key), *args]
        return run_tool(argv, timeout)

    def __enter__(self) -> "Wormhole":
        alphabet = string.ascii_letters + string.digits
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(secrets.choice(alphabet) for _ in range(32)))
        os.chmod(self.key, 0o600)
        argv = [WORMHOLE_BIN / "wormholed", "-H", f"unix://{self.sock}", "-K", self.key,
                "--state-dir", self.tmp / "state"]
        self.proc = Proc("wormholed", argv, self.tmp).__enter__()
        try:
            deadline = time.monotonic() + 10
            while True:
                if not self.proc.alive():
                    raise BenchError(f"wormholed exited with {self.proc.popen.returncode}: "
                                     f"{self.proc.tail(1)}")
                if self.sock.exists() and self.cli("ping", timeout=5).returncode == 0:
                    return self
                if time.monotonic() > deadline:
                    tail = self.proc.tail(1)
                    raise BenchError("wormholed did not answer ping within 10 s"
                                     + (f" ({tail})" if tail else ""))
                time.sleep(0.1)
        except BaseException:
            self.proc.stop()
            raise

    def __exit__(self, *exc) -> None:
        if self.proc:
            self.proc.stop()  # SIGTERM, then SIGKILL after 5 s

    @contextlib.contextmanager
    def proxy(self, tmp: Path, target: int) -> Iterator[int]:
        port = free_port()
        res = self.cli("create", "url", f"127.0.0.1:{port}", "tail", "url", f"127.0.0.1:{target}")
        if res.returncode != 0:
            raise BenchError(f"wormhole create failed: {(res.stderr or res.stdout).strip()[-200:]}")
        wid, _host, port = parse_create_output(res.stdout)
        try:
            wait_listening(port, self.proc)
            yield port, self.proc.popen.pid
        finally:
            with contextlib.suppress(BenchError):
                self.cli("delete", wid)


# --------------------------------------------------------------------------
# The run


Proxy = Callable[[Path, int], ContextManager[tuple[int, int | None]]]  # (port, pid)


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


def measure_row(name: str, proxy: Proxy, tmp: Path, iperf_port: int | None,
                nginx_port: int | None, duration: float, log: Callable[[str], None]) -> Row:
    row = Row(name)
    if iperf_port is not None:
        try:
            with proxy(tmp, iperf_port) as (port, pid):
                log(f"{name}: iperf3 through port {port}")
                # iperf3 -s serves one client at a time: let the connection the
                # readiness probe opened through the proxy reach it and close.
                time.sleep(SETTLE)
                cpu = cpu_meter(pid)
                row.bps = measure_throughput(port, duration)
                used = cpu()
                if used is not None and row.bps:
                    row.cpu_s_per_gb = used / (row.bps * duration / 8 / 1e9)
        except Retried as exc:
            row.bps = exc.value
            row.notes["throughput"] = f"second attempt; the first failed: {exc}"
        except BenchError as exc:
            row.notes["throughput"] = str(exc)
    if nginx_port is not None:
        try:
            with proxy(tmp, nginx_port) as (port, pid):
                log(f"{name}: wrk through port {port}")
                time.sleep(SETTLE)
                cpu = cpu_meter(pid)
                w = measure_conn_rate(port, duration)
                row.conn_per_s = w.requests_per_sec
                used = cpu()
                if used is not None and w.requests:
                    row.cpu_us_per_conn = used / w.requests * 1e6
                if w.socket_errors or w.non_2xx:
                    row.notes["conn/s"] = (f"{w.socket_errors} socket errors, "
                                           f"{w.non_2xx} non-2xx of {w.requests} requests")
        except BenchError as exc:
            row.notes["conn/s"] = str(exc)
    return row


def start_target(stack: contextlib.ExitStack, what: str, cm: ContextManager[int],
                 log: Callable[[str], None]) -> tuple[int | None, str | None]:
    try:
        return stack.enter_context(cm), None
    except BenchError as exc:
        log(f"{what}: {exc}")
        return None, f"{what}: {exc}"


def run(names: list[str], duration: float,
        log: Callable[[str], None]) -> tuple[list[Row], list, int | None]:
    """The proxy rows, then the tunnel table's rows and the veth MTU ([], None unless selected)."""
    import tunnel  # not at the top: it imports this module

    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-"))
    rows: list[Row] = []
    tunnel_rows: list = []
    veth_mtu = None
    try:
        if any(n in ROWS for n in names):
            with contextlib.ExitStack() as stack:
                iperf_port, iperf_err = start_target(stack, "iperf3 server", iperf3_server(tmp), log)
                nginx_port, nginx_err = start_target(stack, "nginx", nginx_server(tmp), log)
                proxies: dict[str, Proxy] = {
                    "direct": direct, "systemd-socket-proxyd": socket_proxyd,
                    "haproxy": haproxy, "socat": socat,
                }
                for name in (n for n in names if n in ROWS):
                    with contextlib.ExitStack() as row_stack:  # the daemon lives for its row
                        proxy = proxies.get(name)
                        if name == "wormhole":
                            try:
                                proxy = row_stack.enter_context(Wormhole(tmp)).proxy
                            except BenchError as exc:
                                log(f"wormhole: {exc}")
                                rows.append(Row(name, error=str(exc)))
                                continue
                        row = measure_row(name, proxy, tmp, iperf_port, nginx_port, duration, log)
                    if iperf_err:
                        row.notes["throughput"] = iperf_err
                    if nginx_err:
                        row.notes["conn/s"] = nginx_err
                    rows.append(row)
        if TUNNEL in names:
            tunnel_rows, veth_mtu = tunnel.run_tunnel(duration, log, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, tunnel_rows, veth_mtu


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds through every finally/with like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    import tunnel  # not at the top: it imports this module

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0,
                    help="seconds per measurement (iperf3 -t, wrk -d); default 5")
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
    missing = [t for t in required_tools(names, tunnel.TOOLS) if not shutil.which(t)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)} (run `make bench`, "
              "which installs them)", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _sigterm)
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    nproc = len(os.sched_getaffinity(0))
    log = (lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    try:
        rows, tunnel_rows, veth_mtu = run(names, args.duration, log)
    except KeyboardInterrupt:
        print("bench: interrupted; every process stopped", file=sys.stderr)
        return 130

    meta = {"date": started.isoformat(timespec="seconds"), "nproc": nproc,
            "kernel": platform.release(), "duration_s": args.duration}
    if args.json:
        print(rows_to_json(rows, meta, tunnel.tunnel_to_json(tunnel_rows) if tunnel_rows else None))
    else:
        header = (f"wormhole bench  {started:%Y-%m-%d %H:%M:%S %Z}  nproc {nproc}  "
                  f"kernel {platform.release()}  {args.duration:g} s per measurement\n")
        tables = []
        if rows:
            tables.append(format_table(rows, "throughput: iperf3, 1 TCP stream; conn/s: wrk -t1 -c50, "
                                             "Connection: close, nginx 'return 200'\n"))
        if tunnel_rows:
            tables.append(tunnel.format_tunnel_table(
                tunnel_rows, tunnel.tunnel_header(args.duration, veth_mtu)))
        print(header + "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    # Run as the module `run`, the one bench/tunnel.py imports: one BenchError class.
    import run
    sys.exit(run.main())
