"""Keep-alive side by side: the wormhole row and HAProxy, run after run, in turn.

On a VM the share of CPU time the host takes from it (steal, in /proc/stat) moves from
minute to minute, and through a proxy the keep-alive rate moves with it: here runs a
minute apart gave the same relay 8,000 and 27,000 requests/s, with 38% and 3% steal.
The main table interleaves its rows' runs; this one adds each run's steal and each
round's ratio: the proxies take turns (run.order_of) against the same nginx, all
running throughout, and a round's runs are seconds apart. The median ratio is over
every round; the second is over the rounds whose two runs (the row's and HAProxy's)
both had steal under STEAL_QUIET, shown beside it, not instead of it.

A third row, "floor", is bench/floor_relay.c (built here with gcc; left out without
it): a relay that does nothing but read() and send() per message on one epoll
thread, the system calls any relay must make. Its ratio to HAProxy is the most a
relay of this design can show on the machine: on a 2-core VM wrk, nginx and the
relay share the cores, and the kernel's TCP work is the same for every relay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import run as bench

PAIRS = 6  # runs of each proxy
STEAL_QUIET = 5.0  # % of the VM's CPU time: a run with less is "quiet"
ROWS = ("wormhole", "haproxy")  # both needed
FLOOR = "floor"
FLOOR_SRC = Path(__file__).resolve().parent / "floor_relay.c"


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
    """One run of each row, seconds apart (with the floor row: a triple)."""
    runs: dict[str, Run]  # row name -> its run

    def ratio_of(self, name: str) -> float | None:
        r, h = self.runs.get(name), self.runs["haproxy"].rate
        return r.rate / h if r and h else None

    def quiet_for(self, name: str) -> bool:
        """That row's run and HAProxy's both had steal under STEAL_QUIET."""
        return name in self.runs and all(self.runs[n].steal < STEAL_QUIET for n in (name, "haproxy"))

    @property
    def ratio(self) -> float | None:
        return self.ratio_of("wormhole")

    @property
    def quiet(self) -> bool:
        return self.quiet_for("wormhole")


@dataclasses.dataclass
class SideBySide:
    pairs: list[Pair] = dataclasses.field(default_factory=list)
    error: str | None = None

    def median_ratio(self, quiet_only: bool = False, name: str = "wormhole") -> float | None:
        return bench.median([p.ratio_of(name) for p in self.pairs
                             if p.ratio_of(name) is not None and (p.quiet_for(name) or not quiet_only)])

    @property
    def has_floor(self) -> bool:
        return any(FLOOR in p.runs for p in self.pairs)


order_of = bench.order_of  # each round's order of the rows


def build_floor(tmp: Path, log: Callable[[str], None]) -> Path | None:
    """bench/floor_relay.c built into tmp; None (said) without gcc or when it fails."""
    exe = tmp / "floor_relay"
    if not shutil.which("gcc"):
        log("keep-alive side by side: no gcc, no floor row")
        return None
    res = subprocess.run(["gcc", "-O2", "-o", exe, FLOOR_SRC], capture_output=True, text=True)
    if res.returncode != 0:
        log(f"keep-alive side by side: floor_relay.c did not build, no floor row: {res.stderr.strip()[-200:]}")
        return None
    return exe


@contextlib.contextmanager
def floor_relay(exe: Path, tmp: Path, target: int):
    port = bench.free_port()
    with bench.Proc("floor-relay", [exe, str(port), str(target)], tmp) as p:
        bench.wait_listening(port, p)
        yield port


def measure(names: list[str], duration: float, log: Callable[[str], None]) -> SideBySide | None:
    """PAIRS runs of wrk -c KEEPALIVE_CONNS through each proxy (and the floor relay), in turn;
    None unless both rows are selected."""
    if not all(n in names for n in ROWS):
        return None
    result = SideBySide()
    tmp = Path(tempfile.mkdtemp(prefix="wormhole-bench-sbs-"))
    try:
        with contextlib.ExitStack() as stack:
            nginx = stack.enter_context(bench.nginx_server(tmp))
            s = stack.enter_context(bench.setup("wormhole", tmp))
            ports = {"wormhole": stack.enter_context(s.tcp(tmp, nginx))[0],
                     "haproxy": stack.enter_context(bench.haproxy(tmp, nginx))[0]}
            exe = build_floor(tmp, log)
            if exe:
                ports[FLOOR] = stack.enter_context(floor_relay(exe, tmp, nginx))
            rows = list(ports)
            log(f"keep-alive side by side: {PAIRS} rounds of {duration:g} s runs of {', '.join(rows)}")
            for i in range(PAIRS):
                runs = {}
                for name in order_of(rows, i):
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
    floor = sbs.has_floor
    lines = [f"keep-alive side by side: wrk -t1 -c{bench.KEEPALIVE_CONNS} for {duration:g} s through the wormhole "
             f"row, haproxy{' and the floor relay' if floor else ''}, in turn,\nsame nginx; steal: the share of "
             f"this machine's CPU time its host took during the run (/proc/stat); ratios to haproxy's run "
             f"of the same round\n"]
    head = f"{'round':<5} {'wormhole req/s':>15} {'steal %':>8} {'haproxy req/s':>14} {'steal %':>8} {'ratio':>6}"
    if floor:
        head += f" {'floor req/s':>12} {'steal %':>8} {'ratio':>6}"
    lines += [head, "-" * len(head)]
    for i, p in enumerate(sbs.pairs, 1):
        w, h = p.runs["wormhole"], p.runs["haproxy"]
        line = (f"{i:<5} {w.rate:>15.0f} {w.steal:>8.1f} {h.rate:>14.0f} {h.steal:>8.1f} "
                f"{bench._fmt(p.ratio, '{:.2f}'):>6}")
        if floor and FLOOR in p.runs:
            f = p.runs[FLOOR]
            line += f" {f.rate:>12.0f} {f.steal:>8.1f} {bench._fmt(p.ratio_of(FLOOR), '{:.2f}'):>6}"
        lines.append(line)
    for name in ("wormhole", FLOOR) if floor else ("wormhole",):
        every, quiet = sbs.median_ratio(name=name), sbs.median_ratio(quiet_only=True, name=name)
        n_quiet = sum(p.quiet_for(name) for p in sbs.pairs)
        lines.append(f"{name}: median ratio {bench._fmt(every, '{:.2f}')} over all {len(sbs.pairs)} rounds; "
                     f"{bench._fmt(quiet, '{:.2f}')} over the {n_quiet} where its and haproxy's steal were under "
                     f"{STEAL_QUIET:g}%" + (" (goal: keep-alive >= 1.2x haproxy)" if name == "wormhole" else
                                            " (the most a relay of this design shows here)"))
    if sbs.error:
        lines.append(f"[error] {sbs.error}")
    return "\n".join(lines)


def to_json(sbs: SideBySide) -> dict:
    return {"pairs": [{name: dataclasses.asdict(r) for name, r in p.runs.items()} for p in sbs.pairs],
            "median_ratio": sbs.median_ratio(), "median_ratio_quiet": sbs.median_ratio(quiet_only=True),
            "floor_median_ratio": sbs.median_ratio(name=FLOOR),
            "floor_median_ratio_quiet": sbs.median_ratio(quiet_only=True, name=FLOOR),
            "steal_quiet_percent": STEAL_QUIET, "error": sbs.error}
