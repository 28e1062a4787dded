#!/usr/bin/env python3
"""The kernel-lab rows of `make bench`: a tunnel built by wormhole against the same tunnel
built by hand, on a kernel with WireGuard and ESP, for two backends:

* kernel-wireguard: `wormhole tunnel-create 198.18.0.2` (wormholed uses the kernel's
  WireGuard where the module is) against `ip link add ... type wireguard` + `wg set` + `ip`;
* ipsec: `wormhole tunnel-create --type ipsec 198.18.0.2` against ESP in tunnel mode made
  with `ip xfrm state add` / `ip xfrm policy add` with wormhole's algorithm.

Each is a table of bench/tunnel.py (same test hosts, iperf3 runs, medians and ratio as
the host's wireguard-go table), run one after the other. Meant to run inside the kernel
lab, which `make bench` does:

    ./scripts/kernel-lab '.venv/bin/python bench/lab.py'

Under qemu without KVM (TCG) everything runs many times slower than on the host: the
figures are for the ratio only, never for absolute speed. Timeouts are multiplied by
--slow (default: $WORMHOLE_TEST_SLOW, which the lab sets, else 1).

Usage: bench/lab.py [--duration S] [--rounds N] [--creates N] [--only NAMES] [--slow F] [--json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (the module tunnel.py imports: one BenchError class)
import tunnel  # noqa: E402

LAB_BACKENDS = ("kernel-wireguard", "ipsec")


def parse_only(text: str | None) -> list[str]:
    """``--only ipsec`` -> the lab tables to run, in their order."""
    if not text:
        return list(LAB_BACKENDS)
    names = {n.strip() for n in text.replace(",", " ").split() if n.strip()}
    unknown = names - set(LAB_BACKENDS)
    if unknown:
        raise ValueError(f"unknown names: {', '.join(sorted(unknown))} (choose from {', '.join(LAB_BACKENDS)})")
    return [n for n in LAB_BACKENDS if n in names]


def virtualization() -> str:
    """The VM this runs in, as ``systemd-detect-virt --vm`` says: "qemu" (the CPU emulated: TCG),
    "kvm", "none"..., or "unknown". (--vm: the lab's root is the host's, whose container files,
    such as /.dockerenv, would make plain systemd-detect-virt answer "docker".)"""
    try:
        res = subprocess.run(["systemd-detect-virt", "--vm"], capture_output=True, text=True, timeout=10)
        return res.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def lab_header(started: datetime.datetime, duration: float, virt: str) -> str:
    note = ("qemu without KVM (TCG): figures are for ratios only, not absolute speed"
            if virt == "qemu" else "figures are for ratios; compare absolute speed only on the same machine")
    return (f"wormhole bench, kernel lab  {started:%Y-%m-%d %H:%M:%S %Z}  nproc {len(os.sched_getaffinity(0))}  "
            f"kernel {platform.release()}  virt {virt}  {duration:g} s per measurement\n"
            f"*** {note} ***\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run (default 5)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="iperf3 runs per tunnel, in the order A B B A ... (default 4)")
    ap.add_argument("--creates", type=int, default=1,
                    help="timed tunnel-creates after the first, each after a tunnel-delete (default 1)")
    ap.add_argument("--only", metavar="NAMES", help=f"comma-separated tables among {', '.join(LAB_BACKENDS)}")
    ap.add_argument("--slow", type=float, default=float(os.environ.get("WORMHOLE_TEST_SLOW") or 1),
                    help="multiply every timeout by this (default: $WORMHOLE_TEST_SLOW, else 1)")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)
    try:
        names = parse_only(args.only)
    except ValueError as exc:
        ap.error(str(exc))
    if args.duration <= 0 or args.rounds < 1 or args.creates < 0 or args.slow <= 0:
        ap.error("--duration, --rounds and --slow must be positive, --creates at least 0")
    tools = dict.fromkeys(t for n in names for t in tunnel.BACKENDS[n].tools)
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        print(f"bench lab: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 1
    tunnel.SLOW = args.slow

    signal.signal(signal.SIGTERM, run._sigterm)
    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    virt = virtualization()
    t0 = time.monotonic()
    log = (lambda msg: print(f"# [{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True))
    log(f"lab tables: {', '.join(names)}; {args.rounds} runs of {args.duration:g} s per tunnel, "
        f"{args.creates} timed create(s), timeouts x{args.slow:g}")
    results: dict[str, tuple[list, int | None, float]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-lab-"))
    try:
        for name in names:
            start = time.monotonic()
            rows, veth_mtu = tunnel.run_tunnel(args.duration, log, tmp, rounds=args.rounds,
                                               creates=args.creates, backend=name)
            results[name] = (rows, veth_mtu, time.monotonic() - start)
            log(f"{name}: table done in {results[name][2]:.0f} s")
    except KeyboardInterrupt:
        print("bench lab: interrupted; every process stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - t0

    if args.json:
        doc = {"date": started.isoformat(timespec="seconds"), "nproc": len(os.sched_getaffinity(0)),
               "kernel": platform.release(), "virt": virt, "duration_s": args.duration,
               "rounds": args.rounds, "seconds": round(total, 1), "tables": {}}
        for name, (rows, veth_mtu, seconds) in results.items():
            doc["tables"][name] = {**tunnel.tunnel_to_json(rows, name), "veth_mtu": veth_mtu,
                                   "seconds": round(seconds, 1)}
        print(json.dumps(doc, indent=2))
    else:
        tables = [tunnel.format_tunnel_table(rows, tunnel.tunnel_header(args.duration, veth_mtu, name, args.rounds),
                                             unit="Mbit/s")
                  for name, (rows, veth_mtu, _) in results.items()]
        timings = ", ".join(f"{name} {seconds:.0f} s" for name, (_, _, seconds) in results.items())
        print(lab_header(started, args.duration, virt) + "\n" + "\n\n".join(tables)
              + f"\n\ntimings (boot not included): {timings}; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
