"""Load balancing: which of a wormhole's tails the next connection goes to.

Pure: no sockets, no clock of its own (callers pass `now`), so every rule is
a unit test. A wormhole with several tails (`add-tail`) has one `Balancer`;
the segment dials what it picks and reports back:

- `order(now)`: the tails to try for one connection, best first. Tails that
  are up come first, in the policy's order: *round-robin* (each connection
  starts one tail further on) or *least-conns* (fewest open connections,
  ties in round-robin order). Tails that are down come last, soonest probe
  first: when every tail is down a connection still tries them all, so a
  tail that came back is found without waiting for its probe.
- `failed(i, now)`: a dial to tail i was refused or timed out: it is marked
  down and skipped; its next probe is due after a backoff that doubles with
  every failure in a row (1 s, 2 s, 4 s ... at most 30 s).
- `succeeded(i)`: a dial (a connection's or a probe's) worked: it is up again.
- `due(now)`: the tails that are down and due for a probe.
- `opened(i)` / `closed(i)`: a connection to tail i opened / closed (the
  counts least-conns reads and `list` shows).
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("round-robin", "least-conns")
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


@dataclass
class TailState:
    up: bool = True
    active: int = 0  # connections open now
    total: int = 0  # connections made so far
    failures: int = 0  # dials that failed so far
    streak: int = 0  # failures in a row (the backoff's exponent)
    probe_at: float = 0.0  # down: when the next probe is due

    def describe(self) -> dict:
        return {"state": "up" if self.up else "down", "connections": self.active,
                "total": self.total, "failures": self.failures}


class Balancer:
    def __init__(self, count: int, policy: str = "round-robin"):
        if count < 1:
            raise ValueError("a balancer needs at least one tail")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        self.policy = policy
        self.tails = [TailState() for _ in range(count)]
        self._next = 0  # round-robin: where the next connection starts

    def order(self, now: float) -> list[int]:
        """The tails one connection tries, best first (every tail, each once)."""
        n = len(self.tails)
        start = self._next
        self._next = (start + 1) % n
        rotation = [(start + k) % n for k in range(n)]
        up = [i for i in rotation if self.tails[i].up]
        if self.policy == "least-conns":
            up.sort(key=lambda i: self.tails[i].active)  # stable: ties keep the rotation
        down = sorted((i for i in rotation if not self.tails[i].up), key=lambda i: self.tails[i].probe_at)
        return up + down

    def opened(self, i: int) -> None:
        t = self.tails[i]
        t.active += 1
        t.total += 1

    def closed(self, i: int) -> None:
        t = self.tails[i]
        t.active = max(0, t.active - 1)

    def failed(self, i: int, now: float) -> bool:
        """Mark tail i down (or keep it down, backing off further); True if it was up."""
        t = self.tails[i]
        was_up = t.up
        t.up = False
        t.failures += 1
        t.probe_at = now + backoff(t.streak)
        t.streak += 1
        return was_up

    def succeeded(self, i: int) -> bool:
        """Tail i answered; True if it was down."""
        t = self.tails[i]
        was_down = not t.up
        t.up, t.streak, t.probe_at = True, 0, 0.0
        return was_down

    def due(self, now: float) -> list[int]:
        return [i for i, t in enumerate(self.tails) if not t.up and t.probe_at <= now]

    def next_probe(self) -> float | None:
        """When the soonest probe is due; None when every tail is up."""
        times = [t.probe_at for t in self.tails if not t.up]
        return min(times) if times else None


def backoff(streak: int) -> float:
    """Seconds before probing a tail that failed `streak` + 1 times in a row."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** min(streak, 16)))
