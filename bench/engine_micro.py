#!/usr/bin/env python3
"""The native relay (wormholed._engine) against TcpProxy and HAProxy on loopback.

* conn/s and the relay's CPU microseconds per connection: wrk -t1 -c50 with
  ``Connection: close`` -> relay -> nginx returning a 2-byte body;
* keep-alive requests/s and CPU microseconds per request (wrk -c50, no close);
* what an idle relayed connection costs the relay: fds, RSS, kernel slab.

Each relay runs in a process of its own (this script with --serve), so that
its CPU time is its own. Usage: bench/engine_micro.py [--duration S] [--idle N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # noqa: E402  (bench/run.py: nginx, haproxy, wrk, CPU meter)

PY = sys.executable
HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------
# the relays, each run by `engine_micro.py --serve KIND PORT TARGET`


def serve_engine(port: int, target: int) -> None:
    from wormholed import engine as _engine

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    eng = _engine.Engine()
    head = socket.create_server(("127.0.0.1", port), backlog=4096)
    head.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head.setblocking(False)
    lid = eng.listen(head.fileno())
    head.close()
    eng.set_target(lid, socket.AF_INET, "127.0.0.1", target)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    eng.close()


def serve_tcpproxy(port: int, target: int) -> None:
    import uvloop

    from wormholed.proxy.tcp import TcpProxy, dial

    async def main() -> None:
        head = socket.create_server(("127.0.0.1", port), backlog=4096)
        proxy = TcpProxy(head, lambda: dial(None, "127.0.0.1", target, wait=proxy.finish_connect))
        proxy.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.aclose()

    uvloop.run(main())


@contextlib.contextmanager
def relay(kind: str, tmp: Path, target: int):
    if kind == "direct":  # no relay: the baseline
        yield target, None
        return
    if kind == "haproxy":
        with bench.haproxy(tmp, target) as (port, pid):
            yield port, pid
        return
    port = bench.free_port()
    with bench.Proc(f"{kind}-{target}", [PY, HERE, "--serve", kind, str(port), str(target)], tmp) as p:
        bench.wait_listening(port, p)
        yield port, p.popen.pid


# --------------------------------------------------------------------------
# measurements


def wrk(port: int, duration: float, close: bool) -> bench.WrkResult:
    argv = ["wrk", "-t1", "-c50", f"-d{duration:g}s"]
    if close:
        argv += ["-H", "Connection: close"]
    res = bench.run_tool(argv + [f"http://127.0.0.1:{port}/"], timeout=duration + 30)
    return bench.parse_wrk(res.stdout)


def rates(kind: str, tmp: Path, nginx: int, duration: float) -> dict:
    out = {}
    for label, close in (("close", True), ("keepalive", False)):
        with relay(kind, tmp, nginx) as (port, pid):
            time.sleep(bench.SETTLE)
            cpu = bench.cpu_meter(pid)
            w = wrk(port, duration, close)
            used = cpu()
            out[label] = (w.requests_per_sec, used / w.requests * 1e6 if used and w.requests else None,
                          w.socket_errors)
    return out


def slab_kib() -> float:
    """KiB in live slab objects (/proc/slabinfo, root); Slab: of /proc/meminfo otherwise."""
    try:
        with open("/proc/slabinfo") as f:
            rows = [line.split() for line in f if not line.startswith(("slabinfo", "#"))]
        return sum(int(r[1]) * int(r[3]) for r in rows) / 1024
    except OSError:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Slab:"))


def fds_of(pid: int | None) -> int:
    return len(os.listdir(f"/proc/{pid}/fd")) if pid else 0


def rss_kib(pid: int | None) -> int:
    if not pid:
        return 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_cost(kind: str, tmp: Path, n: int) -> dict:
    """n idle relayed connections (one exchange each, then idle): what the relay process holds."""
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)
    target = server.getsockname()[1]
    held = []
    try:
        with relay(kind, tmp, target) as (port, pid):
            time.sleep(bench.SETTLE)
            server.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:  # wait_listening's probe, relayed
                    server.accept()[0].close()
            fds0, rss0, slab0 = fds_of(pid), rss_kib(pid), slab_kib()
            server.settimeout(10)
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", port))
                s, _ = server.accept()
                c.sendall(b"hello")
                assert s.recv(10) == b"hello"
                s.sendall(b"world")
                assert c.recv(10) == b"world"
                held += [c, s]
            time.sleep(0.5)
            fds, rss, slab = fds_of(pid), rss_kib(pid), slab_kib()
            # the slab grows for every socket of a connection: client, server (and the relay's two)
            return {"fds": (fds - fds0) / n, "rss_kib": (rss - rss0) / n, "slab_kib": (slab - slab0) / n}
    finally:
        for s in held:
            s.close()
        server.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", nargs=3, metavar=("KIND", "PORT", "TARGET"))
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--only", default="engine,tcpproxy,haproxy")
    ap.add_argument("--rounds", type=int, default=3, help="the median of this many runs per cell")
    args = ap.parse_args()
    if args.serve:
        kind, port, target = args.serve
        {"engine": serve_engine, "tcpproxy": serve_tcpproxy}[kind](int(port), int(target))
        return 0
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kinds = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp, bench.nginx_server(Path(tmp)) as nginx:
        tmp = Path(tmp)
        print("us: the relay process's CPU time per connection / request (median of the rounds);"
              " idle: per idle relayed connection, the relay's fds, RSS, and kernel memory"
              " (live slab objects, less the client's and server's sockets: the direct row)")
        print(f"{'relay':<10} {'conn/s':>9} {'us/conn':>8} {'keepalive req/s':>16} {'us/req':>7}"
              f" {'idle fds':>9} {'idle RSS KiB':>13} {'kernel KiB':>11}")
        runs: dict[str, list] = {kind: [] for kind in ["direct"] + kinds}
        for _ in range(args.rounds):  # interleaved, so that a noisy moment hits every row alike
            for kind in runs:
                r = rates(kind, tmp, nginx, args.duration)
                runs[kind].append((*r["close"], *r["keepalive"]))
        base = None
        for kind, cells in runs.items():
            c, k = [statistics.median(x[i] or 0 for x in cells) for i in range(3)], \
                   [statistics.median(x[i] or 0 for x in cells) for i in range(3, 6)]
            idle = idle_cost(kind, tmp, args.idle)
            base = idle["slab_kib"] if base is None else base
            print(f"{kind:<10} {c[0]:>9.0f} {c[1] or 0:>8.1f} {k[0]:>16.0f} {k[1] or 0:>7.1f}"
                  f" {idle['fds']:>9.2f} {idle['rss_kib']:>13.2f} {idle['slab_kib'] - base:>11.2f}"
                  + (f"  ({c[2]:.0f}/{k[2]:.0f} socket errors)" if c[2] or k[2] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
