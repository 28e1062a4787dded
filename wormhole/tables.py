"""`list`'s table: rows from the daemon's answer, rates between two answers, column layout.

No click and no daemon: the fast path (fast.py) prints `list` with it as cli.py does."""

from __future__ import annotations


def list_table(rows: list[dict], rates: dict[str, tuple[float, float, float]] | None = None) -> list[tuple[str, ...]]:
    """`list`'s table, header first; with RATES (from list_rates), the CONN/S and BYTES/S
    IN/OUT columns too ('-' for a wormhole that has no rate yet). A wormhole with several
    tails says how many in TAIL, and a row for each tail follows it: its url, its state
    (up/down, with its failed dials), its connections."""
    header = ("ID", "HEAD", "TAIL", "STATE", "CONNS", "REFUSED", "BYTES IN/OUT", "LIMITS", "CHILD")
    if rates is not None:
        header = header[:5] + ("CONN/S",) + header[5:7] + ("BYTES/S IN/OUT",) + header[7:]
    table = [header]
    for r in rows:
        child = r.get("child") or (f"(on {r['remote']})" if r.get("remote") else "-")
        limits = [f"max-conns {r['max_conns']}"] if r.get("max_conns") else []
        if r.get("idle_timeout"):
            from .spec import format_duration

            limits.append(f"idle-timeout {format_duration(r['idle_timeout'])}")
        conns, bytes_in, bytes_out = (rates or {}).get(r["id"], (None, None, None))
        tails = r.get("tails") or []
        tail = f"{len(tails)} tails:" if len(tails) > 1 else r["tail"]
        row = [r["id"], r["head"], tail, r["state"], f"{r['connections']}/{r['total']}"]
        row += [human_rate(conns)] if rates is not None else []
        row += [str(r.get("refused", 0)), f"{r['bytes_in']}/{r['bytes_out']}"]
        row += [f"{human_rate(bytes_in)}/{human_rate(bytes_out)}"] if rates is not None else []
        table.append((*row, ", ".join(limits) or "-", child))
        if len(tails) > 1:
            for t in tails:
                state = t.get("state", "-")
                if t.get("failures"):
                    state += f" ({t['failures']} failed)"
                counts = f"{t['connections']}/{t['total']}" if "total" in t else "-"
                table.append(("", "", f"  {t['url']}", state, counts) + ("-",) * (len(header) - 5))
    return table


RATE_COUNTERS = ("total", "bytes_in", "bytes_out")  # list's counters whose rates --watch shows


def list_rates(before: list[dict], after: list[dict], seconds: float) -> dict[str, tuple[float, float, float]]:
    """Per wormhole id in both list results, taken SECONDS apart: (connections/s, bytes in/s,
    bytes out/s). A wormhole whose counters went back (deleted and made again under its id,
    the daemon restarted) has no rate; none has when SECONDS is not positive."""
    if seconds <= 0:
        return {}
    old = {r.get("id"): r for r in before}
    rates = {}
    for r in after:
        prev = old.get(r.get("id"))
        if prev is None:
            continue
        deltas = [r.get(k, 0) - prev.get(k, 0) for k in RATE_COUNTERS]
        if min(deltas) >= 0:
            rates[r["id"]] = tuple(d / seconds for d in deltas)
    return rates


def human_rate(value: float | None) -> str:
    """A rate, short: '-' (none), 0, 0.5, 12, 950, 1.2k, 34M, 5.6G."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            scaled = value / size
            return f"{scaled:.1f}{unit}" if scaled < 10 else f"{scaled:.0f}{unit}"
    return f"{value:.1f}".removesuffix(".0") if value < 10 else f"{value:.0f}"


def table_lines(table: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
