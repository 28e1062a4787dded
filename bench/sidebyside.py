"""Keep-alive side by side: the wormhole row and HAProxy, run after run, alternating.

The main table measures a row's runs one after another, then the next row's. On a VM
the share of CPU time the host takes from it (steal, in /proc/stat) moves from minute to
minute, and through a proxy the keep-alive rate moves with it: here runs a minute apart
gave the same relay 8,000 and 27,000 requests/s, with 38% and 3% steal. So this table
alternates the two proxies (A B, B A, A B, ...) against the same nginx, both running
throughout, and gives each pair's ratio with each run's steal: a pair's two runs are
seconds apart. The median ratio is over every pair; the second is over the pairs
whose runs both had steal under STEAL_QUIET, shown beside it, not instead of it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import run as bench

PAIRS = 6  # runs of each proxy
STEAL_QUIET = 5.0  # % of the VM's CPU time: a run with less is "quiet"
ROWS = ("wormhole", "haproxy")


def cpu_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_meter() -> Callable[[], float]:
    """Call to get the steal share (%) of all CPU time since the meter was made."""
    before = cpu_ticks()

    def steal() -> float:
        d = [b - a for a, b in zip(before, cpu_ticks())]
        return 100.0 * d[7] / sum(d) if sum(d) else 0.0
    return steal


@dataclasses.dataclass
class Run:
    rate: float  # requests/s
    steal: float  # %


@dataclasses.dataclass
class Pair:
    runs: dict[str, Run]  # row name -> its run

    @property
    def ratio(self) -> float | None:
        w, h = self.runs["wormhole"].rate, self.runs["haproxy"].rate
        return w / h if h else None

    @property
    def quiet(self) -> bool:
        return all(r.steal < STEAL_QUIET for r in self.runs.values())


@dataclasses.dataclass
class SideBySide:
    pairs: list[Pair] = dataclasses.field(default_factory=list)
    error: str | None = None

    def median_ratio(self, quiet_only: bool = False) -> float | None:
        return bench.median([p.ratio for p in self.pairs if p.ratio is not None and (p.quiet or not quiet_only)])


def measure(names: list[str], duration: float, log: Callable[[str], None]) -> SideBySide | None:
    """PAIRS runs of wrk -c KEEPALIVE_CONNS through each proxy, alternating; None unless both
    rows are selected."""
    if not all(n in names for n in ROWS):
        return None
    result = SideBySide()
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-sbs-"))
    try:
        with bench.nginx_server(tmp) as nginx, bench.setup("wormhole", tmp) as s, \
                s.tcp(tmp, nginx) as (wport, _), bench.haproxy(tmp, nginx) as (hport, _):
            ports = {"wormhole": wport, "haproxy": hport}
            log(f"keep-alive side by side: {PAIRS} pairs of {duration:g} s runs")
            for i in range(PAIRS):
                order = ROWS if i % 2 == 0 else ROWS[::-1]
                runs = {}
                for name in order:
                    steal = steal_meter()
                    w = bench.measure_wrk(ports[name], duration, bench.KEEPALIVE_CONNS, close=False)
                    runs[name] = Run(w.requests_per_sec, steal())
                result.pairs.append(Pair(runs))
    except bench.BenchError as exc:
        log(f"keep-alive side by side: {exc}")
        result.error = str(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def table(sbs: SideBySide, duration: float) -> str:
    lines = [f"keep-alive side by side: wrk -t1 -c{bench.KEEPALIVE_CONNS} for {duration:g} s through the wormhole "
             f"row and haproxy, alternating\n(A B, B A, ...), same nginx; steal: the share of this machine's CPU "
             f"time its host took during the run (/proc/stat)\n",
             f"{'pair':<5} {'wormhole req/s':>15} {'steal %':>8} {'haproxy req/s':>14} {'steal %':>8} {'ratio':>6}",
             "-" * 61]
    for i, p in enumerate(sbs.pairs, 1):
        w, h = p.runs["wormhole"], p.runs["haproxy"]
        lines.append(f"{i:<5} {w.rate:>15.0f} {w.steal:>8.1f} {h.rate:>14.0f} {h.steal:>8.1f} "
                     f"{bench._fmt(p.ratio, '{:.2f}'):>6}")
    every, quiet = sbs.median_ratio(), sbs.median_ratio(quiet_only=True)
    n_quiet = sum(p.quiet for p in sbs.pairs)
    lines.append(f"median ratio {bench._fmt(every, '{:.2f}')} over all {len(sbs.pairs)} pairs; "
                 f"{bench._fmt(quiet, '{:.2f}')} over the {n_quiet} with both steals under {STEAL_QUIET:g}%"
                 f" (goal: keep-alive >= 1.2x haproxy)")
    if sbs.error:
        lines.append(f"[error] {sbs.error}")
    return "\n".join(lines)


def to_json(sbs: SideBySide) -> dict:
    return {"pairs": [{name: dataclasses.asdict(r) for name, r in p.runs.items()} for p in sbs.pairs],
            "median_ratio": sbs.median_ratio(), "median_ratio_quiet": sbs.median_ratio(quiet_only=True),
            "steal_quiet_percent": STEAL_QUIET, "error": sbs.error}
