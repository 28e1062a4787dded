"""Overlay address pairs, tunnel ports, interface names and MTUs: what two tunnel ends agree on."""

import ipaddress
import random
import time

import pytest

from wormholed.tunnels.ipam import (
    AllocationError,
    allocate_pair,
    interface_name,
    overlay_mtu,
    overlay_network,
    port_candidates,
    tunnel_id,
)


def _check_pair(cidr, pair, used=()):
    net = ipaddress.ip_network(cidr, strict=False)
    a, b = (ipaddress.ip_address(x) for x in pair)
    assert a in net and b in net
    assert int(b) == int(a) + 1 and (int(a) - int(net.network_address)) % 2 == 0
    assert not set(pair) & set(used)


def test_overlay_network():
    assert str(overlay_network("100.64.0.0/14")) == "100.64.0.0/14"
    assert str(overlay_network("100.64.1.7/14")) == "100.64.0.0/14"  # host bits allowed
    assert str(overlay_network("fd00::1/64")) == "fd00::/64"
    for junk in ("", "100.64.0.0/33", "nonsense", "100.64.0/14x"):
        with pytest.raises(ValueError, match="invalid overlay network"):
            overlay_network(junk)


@pytest.mark.parametrize("cidr", ["100.64.0.0/14", "10.0.0.0/24", "10.0.0.0/30", "10.0.0.4/31",
                                  "fd00::/64", "fd00::/126", "fd00::/127"])
def test_pairs_are_adjacent_and_inside(cidr):
    rng = random.Random(1)
    for _ in range(50):
        _check_pair(cidr, allocate_pair(cidr, [], rng))


def test_used_addresses_are_avoided_and_outsiders_ignored():
    used = ["10.0.0.1", "10.0.0.2/32", "192.168.1.1", "fd00::1"]  # the last two lie outside
    pairs = {allocate_pair("10.0.0.0/29", used, random.Random(i)) for i in range(100)}
    assert pairs == {("10.0.0.4", "10.0.0.5"), ("10.0.0.6", "10.0.0.7")}


def test_junk_in_used_is_refused():
    with pytest.raises(ValueError, match="'bogus'"):
        allocate_pair("10.0.0.0/24", ["bogus"])


def test_last_free_pair_is_found():
    """A /28 with all but one pair used: every rng finds that pair (random tries fail, the scan finds it)."""
    used = [f"10.1.2.{i}" for i in range(16) if i not in (10, 11)]
    for seed in range(20):
        assert allocate_pair("10.1.2.0/28", used, random.Random(seed)) == ("10.1.2.10", "10.1.2.11")
    with pytest.raises(AllocationError):  # one address of a pair takes the whole pair
        allocate_pair("10.1.2.0/28", used + ["10.1.2.11"])


@pytest.mark.parametrize("cidr, used, message", [
    ("100.64.0.0/30", ["100.64.0.0", "100.64.0.3"],
     "overlay network 100.64.0.0/30 has no free address pair (all 2 pairs are in use)"),
    ("100.64.0.0/31", ["100.64.0.1"],
     "overlay network 100.64.0.0/31 has no free address pair (its only pair is in use)"),
    ("fd00::/126", ["fd00::1", "fd00::2"],
     "overlay network fd00::/126 has no free address pair (all 2 pairs are in use)"),
])
def test_exhaustion_is_exact(cidr, used, message):
    with pytest.raises(AllocationError) as e:
        allocate_pair(cidr, used)
    assert str(e.value) == message


@pytest.mark.parametrize("cidr", ["100.64.0.5/32", "fd00::5/128"])
def test_network_without_a_pair(cidr):
    with pytest.raises(AllocationError, match="too small for an address pair"):
        allocate_pair(cidr, [])


def test_one_pair_networks():
    assert allocate_pair("100.64.0.0/31", []) == ("100.64.0.0", "100.64.0.1")
    assert allocate_pair("fd00::/127", ["10.0.0.1"]) == ("fd00::", "fd00::1")


def test_same_tunnel_from_both_ends():
    assert tunnel_id("d41d8cd9", "0cc175b9") == tunnel_id("0cc175b9", "d41d8cd9") == "0cc175b9-d41d8cd9"
    used = ["100.64.0.8", "100.64.0.9"]
    first = allocate_pair("100.64.0.0/14", used, random.Random(tunnel_id("a", "b")))
    again = allocate_pair("100.64.0.0/14", used, random.Random(tunnel_id("b", "a")))
    assert first == again
    assert allocate_pair("100.64.0.0/14", used, random.Random("other")) != first


def test_ipv6_64_is_random_and_fast():
    start = time.monotonic()
    pairs = {allocate_pair("fd00:1::/64", ["fd00:1::1"]) for _ in range(200)}
    assert time.monotonic() - start < 1
    assert len(pairs) == 200
    for pair in pairs:
        _check_pair("fd00:1::/64", pair, ["fd00:1::1"])


def test_ipv6_126():
    pairs = {allocate_pair("fd00::/126", ["fd00::2/128"], random.Random(i)) for i in range(20)}
    assert pairs == {("fd00::", "fd00::1")}


def test_big_ipv4_network_with_many_used_is_fast():
    base = int(ipaddress.ip_address("100.64.0.0"))
    used = [str(ipaddress.ip_address(base + i)) for i in range(0, 2 ** 18 - 2, 3)]  # two pairs in three taken
    start = time.monotonic()
    pair = allocate_pair("100.64.0.0/14", used, random.Random(7))
    assert time.monotonic() - start < 2
    _check_pair("100.64.0.0/14", pair, used)


def test_big_ipv4_network_nearly_full():
    """131071 of 131072 pairs used: the random tries fail and the scan finds the last one."""
    base = int(ipaddress.ip_address("100.64.0.0"))
    last = base + 2 ** 18 - 2
    used = [str(ipaddress.ip_address(base + i)) for i in range(0, 2 ** 18 - 2, 2)]
    start = time.monotonic()
    assert allocate_pair("100.64.0.0/14", used, random.Random(3)) == (
        str(ipaddress.ip_address(last)), str(ipaddress.ip_address(last + 1)))
    assert time.monotonic() - start < 5
    with pytest.raises(AllocationError, match="all 131072 pairs are in use"):
        allocate_pair("100.64.0.0/14", used + [str(ipaddress.ip_address(last + 1))])


def test_port_candidates():
    ports = port_candidates(4500, 4509, [4501, 4503, 80], random.Random(1))
    assert sorted(ports) == [4500, 4502, 4504, 4505, 4506, 4507, 4508, 4509]
    assert ports != sorted(ports)  # shuffled
    assert port_candidates(4500, 4500, []) == [4500]


def test_port_candidates_order_covers_all():
    orders = {tuple(port_candidates(4500, 4503, [], random.Random(i))) for i in range(200)}
    assert all(sorted(o) == [4500, 4501, 4502, 4503] for o in orders)
    assert {o[0] for o in orders} == {4500, 4501, 4502, 4503}  # any port may come first
    assert len(orders) > 12


def test_port_candidates_all_used():
    with pytest.raises(AllocationError) as e:
        port_candidates(4500, 4599, range(4500, 4600))
    assert str(e.value) == "no free UDP port in 4500-4599 (all 100 in use by tunnels)"


@pytest.mark.parametrize("lo, hi", [(4600, 4500), (0, 10), (65535, 65536)])
def test_port_candidates_bad_range(lo, hi):
    with pytest.raises(ValueError, match=f"invalid UDP port range {lo}-{hi}"):
        port_candidates(lo, hi, [])


def test_interface_name():
    name = interface_name("5f0c3b7e9a1d4c2b8e6f0a9d3c7b1e4f")
    assert name == interface_name("5f0c3b7e9a1d4c2b8e6f0a9d3c7b1e4f")  # stable
    assert len(name) == 13 <= 15 and name.startswith("wh-")
    int(name[3:], 16)
    assert name != interface_name("5f0c3b7e9a1d4c2b8e6f0a9d3c7b1e4e")
    assert interface_name("") == "wh-e3b0c44298"  # sha256 of nothing


def test_overlay_mtu():
    assert overlay_mtu(1500) == 1420
    assert overlay_mtu(9000) == 8920
    assert overlay_mtu(656) == 576
    with pytest.raises(ValueError, match="underlay MTU 600 leaves 520 bytes"):
        overlay_mtu(600)
