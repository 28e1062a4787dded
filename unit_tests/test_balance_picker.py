"""The load-balancing picker: round-robin, least-conns, down and up with backoff."""

import pytest

from wormholed.balance import BACKOFF_MAX, Balancer, backoff


def firsts(b, n, now=0.0):
    return [b.order(now)[0] for _ in range(n)]


def test_round_robin_rotates_over_every_tail():
    b = Balancer(3)
    assert firsts(b, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert sorted(b.order(0)) == [0, 1, 2], "a connection may try every tail, each once"


def test_least_conns_prefers_the_fewest_open_with_ties_in_rotation():
    b = Balancer(3, "least-conns")
    for i in (0, 0, 2):
        b.opened(i)
    assert b.order(0)[0] == 1
    b.opened(1)
    b.opened(1)  # actives: 2, 2, 1
    assert b.order(0)[0] == 2
    b.closed(0)
    b.closed(0)  # 0, 2, 1
    assert b.order(0) == [0, 2, 1]
    assert [t.total for t in b.tails] == [2, 2, 1] and [t.active for t in b.tails] == [0, 2, 1]


def test_a_failed_tail_is_down_skipped_and_tried_last():
    b = Balancer(3)
    assert b.failed(1, now=100.0) is True
    assert b.failed(1, now=100.0) is False, "already down"
    for _ in range(6):
        order = b.order(100.0)
        assert order[-1] == 1 and order[0] != 1
    assert b.tails[1].describe() == {"state": "down", "connections": 0, "total": 0, "failures": 2}


def test_probes_back_off_and_a_success_brings_the_tail_back():
    b = Balancer(2)
    b.failed(0, now=10.0)
    assert b.due(10.5) == [] and b.due(11.0) == [0] and b.next_probe() == 11.0
    b.failed(0, now=11.0)  # the probe failed: 2 s now
    assert b.due(12.9) == [] and b.due(13.0) == [0]
    b.failed(0, now=13.0)
    assert b.next_probe() == 17.0
    assert b.succeeded(0) is True and b.succeeded(0) is False
    assert b.tails[0].up and b.next_probe() is None and b.due(1e9) == []
    b.failed(0, now=20.0)
    assert b.next_probe() == 21.0, "the backoff starts again after a success"


def test_backoff_doubles_up_to_a_ceiling():
    assert [backoff(k) for k in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(10_000) == BACKOFF_MAX


def test_every_tail_down_still_orders_them_all_soonest_probe_first():
    b = Balancer(3)
    b.failed(0, now=5.0)
    b.failed(0, now=6.0)  # probe at 8
    b.failed(1, now=5.0)  # probe at 6
    b.failed(2, now=6.5)  # probe at 7.5
    assert b.order(7.0) == [1, 2, 0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Balancer(0)
    with pytest.raises(ValueError):
        Balancer(2, "random")
