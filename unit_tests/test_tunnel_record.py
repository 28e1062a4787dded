"""Tunnel records: validation, and the WireGuard config both halves derive from theirs."""

import dataclasses

import pytest

from wormholed.tunnels.table import Tunnel
from wormholed.tunnels.wgconf import b64, new_private_key, public_key


def halves():
    ka, kb = new_private_key(), new_private_key()
    a = Tunnel("aaaa", "192.0.2.2", "wireguard", "wireguard-go", "wh-0000000001", "100.64.0.2", "100.64.0.3",
               "192.0.2.1", 4500, "192.0.2.2", 4501, b64(ka), b64(public_key(kb)))
    b = Tunnel("bbbb", "192.0.2.1", "wireguard", "kernel", "wh-0000000002", "100.64.0.3", "100.64.0.2",
               "192.0.2.2", 4501, "192.0.2.1", 4500, b64(kb), b64(public_key(ka)))
    return a, b


def test_both_halves_derive_one_preshared_key_and_mirror_each_other():
    a, b = halves()
    ca, cb = a.config(b"secret", "bbbb"), b.config(b"secret", "aaaa")
    assert ca.peer.preshared_key == cb.peer.preshared_key
    assert ca.peer.public_key == public_key(cb.private_key) and cb.peer.public_key == public_key(ca.private_key)
    assert ca.peer.endpoint == ("192.0.2.2", 4501) and cb.peer.endpoint == ("192.0.2.1", 4500)
    assert ca.peer.allowed_ips == ("100.64.0.3/32",) and ca.listen_port == 4500 and ca.peer.keepalive == 25
    assert a.config(b"other", "bbbb").peer.preshared_key != ca.peer.preshared_key


def test_a_record_reads_back():
    a, _ = halves()
    assert Tunnel.from_record(dataclasses.asdict(a)) == a


@pytest.mark.parametrize("change", [
    {"local_port": "4500"}, {"local_ip": "not-an-ip"}, {"private_key": "short"}, {"extra": 1}, {"peer_id": 7},
])
def test_a_bad_record_is_refused(change):
    record = {**dataclasses.asdict(halves()[0]), **change}
    with pytest.raises((ValueError, TypeError)):
        Tunnel.from_record(record)
