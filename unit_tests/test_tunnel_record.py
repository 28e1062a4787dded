"""Tunnel records: validation, and the WireGuard config both halves derive from theirs."""

import dataclasses

import pytest

from wormholed.tunnels.record import Tunnel
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


def ipsec_halves(udp=False):
    import base64
    from wormholed.tunnels import ipsec
    k1, k2 = (base64.b64encode(ipsec.new_key()).decode() for _ in range(2))
    ports = (4500, 4501) if udp else (0, 0)
    a = Tunnel("aaaa", "192.0.2.2", "ipsec", "xfrm", "", "100.64.0.2", "100.64.0.3", "192.0.2.1", ports[0],
               "192.0.2.2", ports[1], reqid=ipsec.REQID_BASE + 7, spi_in=0x1001, key_in=k1, spi_out=0x2002, key_out=k2)
    b = Tunnel("bbbb", "192.0.2.1", "ipsec", "xfrm", "", "100.64.0.3", "100.64.0.2", "192.0.2.2", ports[1],
               "192.0.2.1", ports[0], reqid=ipsec.REQID_BASE + 9, spi_in=0x2002, key_in=k2, spi_out=0x1001, key_out=k1)
    return a, b


@pytest.mark.parametrize("udp", [False, True])
def test_ipsec_halves_mirror_each_other(udp):
    a, b = ipsec_halves(udp)
    (a_out, a_in), (b_out, b_in) = a.half().states(), b.half().states()
    assert (a_out.src, a_out.dst, a_out.spi, a_out.aead) == (b_in.src, b_in.dst, b_in.spi, b_in.aead)
    assert (b_out.src, b_out.dst, b_out.spi, b_out.aead) == (a_in.src, a_in.dst, a_in.spi, a_in.aead)
    assert a_out.aead.name == "rfc4106(gcm(aes))" and a_out.aead.icv_bits == 128
    if udp:
        assert (a_out.encap.sport, a_out.encap.dport) == (b_in.encap.sport, b_in.encap.dport) == (4500, 4501)
    else:
        assert a_out.encap is None
    out, in_, fwd = a.half().policies()
    assert (out.dir, str(out.sel.src), out.sel.src_len, str(out.sel.dst)) == ("out", "100.64.0.2", 32, "100.64.0.3")
    assert (out.tmpl_src, out.tmpl_dst) == ("192.0.2.1", "192.0.2.2") and out.reqid == a.reqid
    assert in_.sel == fwd.sel and (in_.tmpl_src, in_.tmpl_dst) == ("192.0.2.2", "192.0.2.1")
    assert Tunnel.from_record(dataclasses.asdict(a)) == a


def test_old_records_read_back_with_defaults():
    record = dataclasses.asdict(halves()[0])
    for name in ("reqid", "spi_in", "key_in", "spi_out", "key_out"):
        del record[name]
    t = Tunnel.from_record(record)
    assert t == Tunnel(**record) and (t.reqid, t.spi_in, t.key_in) == (0, 0, "")


def test_ipsec_ids():
    import random
    from wormholed.tunnels import ipsec
    rng = random.Random(1)
    spis = {ipsec.new_spi({0x100}, rng) for _ in range(100)}
    assert all(ipsec.SPI_MIN <= s < 2**32 for s in spis) and 0x100 not in spis
    taken = {ipsec.REQID_BASE + n for n in range(1, 0x10000) if n != 42}
    assert ipsec.new_reqid(taken, rng) == ipsec.REQID_BASE + 42 and ipsec.ours(ipsec.REQID_BASE + 42)
    assert not ipsec.ours(1) and not ipsec.ours(ipsec.REQID_BASE)
    with pytest.raises(ipsec.IpsecError):
        ipsec.new_reqid(taken | {ipsec.REQID_BASE + 42}, rng)
    assert len(ipsec.new_key()) == 20
