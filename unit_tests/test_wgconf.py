"""WireGuard keys, the derived preshared key, UAPI text both ways, and the kernel (pyroute2) dialect.

The UAPI replies in data/ are real: captured from wireguard-go by data/capture_uapi.py."""

import hashlib
import hmac
import inspect
import subprocess
from pathlib import Path
from socket import AF_INET, AF_INET6, inet_pton

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyroute2.netlink.generic.wireguard import AsyncWireGuard, WireGuard, wgmsg

from wormholed.tunnels.wgconf import (
    PSK_SALT,
    DeviceStatus,
    UapiError,
    WgConfig,
    WgPeer,
    b64,
    derive_psk,
    from_b64,
    kernel_remove_args,
    kernel_set_args,
    new_private_key,
    parse_kernel_info,
    parse_uapi_get,
    parse_uapi_reply,
    public_key,
    uapi_set,
)

DATA = Path(__file__).parent / "data"
PRIV = bytes(range(32))
PEER_PUB = bytes(range(32, 64))
PSK = bytes(range(64, 96))


def _data(name: str) -> str:
    return (DATA / name).read_text()


def _config(endpoint=("192.0.2.2", 4501), allowed=("100.64.0.2/32",)) -> WgConfig:
    return WgConfig(PRIV, 4500, WgPeer(PEER_PUB, PSK, endpoint, allowed))


# --- HKDF ---------------------------------------------------------------------------------------

def _rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 straight from RFC 5869 section 2, with hmac."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm, counter = okm + block, counter + 1
    return okm[:length]


def test_hkdf_rfc5869_case_1():
    ikm, salt, info = bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA))
    okm = bytes.fromhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    assert HKDF(algorithm=hashes.SHA256(), length=42, salt=salt, info=info).derive(ikm) == okm
    assert _rfc5869(ikm, salt, info, 42) == okm


@pytest.mark.parametrize("secret, tid", [
    (b"0123456789abcdefABCDEFGHIJ0123456789abcd", "3f2a-9c1e"),
    (b"k", "0cc175b9c0f1b6a831c399e269772661-92eb5ffee6ae2fec3ad71c777531578f"),
    (b"\xff" * 64, "\u00e9t\u00e9-x"),
])
def test_derive_psk_is_rfc5869(secret, tid):
    assert derive_psk(secret, tid) == _rfc5869(secret, PSK_SALT, tid.encode(), 32)


def test_derive_psk_pinned():
    assert derive_psk(b"0123456789abcdefABCDEFGHIJ0123456789abcd", "3f2a-9c1e").hex() == (
        "f44e851b680db65ad339f7315b101c383cdcb7a9872dca4a8c6ca766e6db39ac")


def test_derive_psk_differs_per_tunnel_and_secret():
    keys = {derive_psk(s, t) for s in (b"one", b"two") for t in ("a-b", "a-c")}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)


# --- keys ---------------------------------------------------------------------------------------

def _wg(*args: str, stdin: str) -> str:
    return subprocess.run(["/usr/bin/wg", *args], input=stdin, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_public_key_matches_wg_pubkey():
    for priv in (new_private_key(), new_private_key(), PRIV):
        assert len(priv) == 32
        assert b64(public_key(priv)) == _wg("pubkey", stdin=b64(priv) + "\n")


def test_wg_genkey_keys_are_read():
    text = subprocess.run(["/usr/bin/wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    assert b64(public_key(from_b64(text))) == _wg("pubkey", stdin=text + "\n")


def test_new_private_keys_differ():
    assert new_private_key() != new_private_key()


def test_b64_round_trip():
    assert from_b64(b64(PRIV)) == PRIV
    assert b64(bytes(32)) == "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


@pytest.mark.parametrize("text, why", [
    (b64(bytes(31)), "31 bytes instead of 32"),
    (b64(bytes(33)), "33 bytes instead of 32"),
    ("", "0 bytes instead of 32"),
    ("not base64 at all!", "not base64"),
    (b64(bytes(32))[:-1], "not base64"),
])
def test_from_b64_refuses(text, why):
    with pytest.raises(ValueError, match=why):
        from_b64(text)


def test_peer_values_are_normalized():
    peer = WgPeer(PEER_PUB, PSK, ["192.0.2.2", 4501], ["100.64.0.2", "fd00::7/64", "10.1.2.3/8"])
    assert peer.allowed_ips == ("100.64.0.2/32", "fd00::/64", "10.0.0.0/8")  # as a status reports them
    assert peer.endpoint == ("192.0.2.2", 4501)
    hash(peer)


def test_config_values_are_checked():
    with pytest.raises(ValueError, match="private key must be 32 bytes, not 3"):
        WgConfig(b"abc", 4500, _config().peer)
    with pytest.raises(ValueError, match="listen port 70000"):
        WgConfig(PRIV, 70000, _config().peer)
    with pytest.raises(ValueError):
        WgPeer(PEER_PUB, PSK, ("[2001:db8::2]", 4501), ())  # an IP literal, no brackets
    with pytest.raises(ValueError, match="endpoint port 0"):
        WgPeer(PEER_PUB, PSK, ("192.0.2.2", 0), ())
    with pytest.raises(ValueError, match="keepalive 70000"):
        WgPeer(PEER_PUB, PSK, None, (), 70000)
    with pytest.raises(ValueError, match="'100.64.0.300/32'"):
        WgPeer(PEER_PUB, PSK, None, ("100.64.0.300/32",))


# --- UAPI set -----------------------------------------------------------------------------------

def _expected_set(endpoint_line: str) -> bytes:
    return ("set=1\n"
            f"private_key={PRIV.hex()}\n"
            "listen_port=4500\n"
            "replace_peers=true\n"
            f"public_key={PEER_PUB.hex()}\n"
            f"preshared_key={PSK.hex()}\n"
            f"{endpoint_line}"
            "persistent_keepalive_interval=25\n"
            "replace_allowed_ips=true\n"
            "allowed_ip=100.64.0.2/32\n"
            "\n").encode()


def test_uapi_set_ipv4():
    assert uapi_set(_config()) == _expected_set("endpoint=192.0.2.2:4501\n")
    assert PRIV.hex() == "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"  # lowercase hex


def test_uapi_set_ipv6():
    assert uapi_set(_config(("2001:db8::2", 4501))) == _expected_set("endpoint=[2001:db8::2]:4501\n")


def test_uapi_set_without_endpoint_and_with_prefixes():
    text = uapi_set(_config(None, ("100.64.0.2", "fd00::7/64"))).decode()
    assert "endpoint=" not in text
    assert text.endswith("replace_allowed_ips=true\nallowed_ip=100.64.0.2/32\nallowed_ip=fd00::/64\n\n")


# --- UAPI get: real dumps -------------------------------------------------------------------------

def test_real_dump_after_a_handshake():
    near, far = parse_uapi_get(_data("uapi_get_ipv4.txt")), parse_uapi_get(_data("uapi_get_ipv4_far.txt"))
    assert (near.listen_port, near.fwmark, far.listen_port) == (4500, 0, 4501)
    (p,) = near.peers
    assert p.endpoint == "192.0.2.2:4501" and far.peers[0].endpoint == "192.0.2.1:4500"
    assert p.public_key == public_key(far.private_key) and far.peers[0].public_key == public_key(near.private_key)
    assert p.preshared_key == far.peers[0].preshared_key and len(p.preshared_key) == 32
    assert p.last_handshake == pytest.approx(1795263210.6, abs=1)
    assert p.rx_bytes > 0 and p.tx_bytes > 0 and p.keepalive == 25
    assert p.allowed_ips == ("100.64.0.2/32",) and far.peers[0].allowed_ips == ("100.64.0.1/32",)


def test_real_dump_exact_values():
    text = _data("uapi_get_ipv4.txt")
    values = dict(line.split("=", 1) for line in text.splitlines() if line)
    (p,) = parse_uapi_get(text).peers
    assert p.last_handshake == int(values["last_handshake_time_sec"]) + int(values["last_handshake_time_nsec"]) / 1e9
    assert (p.rx_bytes, p.tx_bytes) == (int(values["rx_bytes"]), int(values["tx_bytes"]))
    assert p.public_key.hex() == values["public_key"]


def test_real_dump_ipv6_endpoint():
    (p,) = parse_uapi_get(_data("uapi_get_ipv6.txt")).peers
    assert p.endpoint == "[2001:db8::2]:4511" and p.last_handshake is not None


def test_real_dump_before_a_handshake():
    dev = parse_uapi_get(_data("uapi_get_no_handshake.txt"))
    assert dev.peers[0].last_handshake is None and dev.peers[0].endpoint == "192.0.2.2:4501"


def test_real_dump_of_a_fresh_device():
    dev = parse_uapi_get(_data("uapi_get_fresh.txt"))
    assert dev.private_key is None and dev.peers == () and dev.fwmark == 0 and dev.listen_port > 0


def test_real_dump_with_fwmark_and_two_allowed_ips():
    dev = parse_uapi_get(_data("uapi_get_fwmark_two_allowed.txt"))
    assert dev.fwmark == 0x1234
    assert dev.peers[0].allowed_ips == ("100.64.0.2/32", "fd00::2/128")


def test_real_dump_matches_the_config_that_made_it():
    """The two ends' dumps describe configs whose uapi_set is what the capture sent."""
    near, far = parse_uapi_get(_data("uapi_get_ipv6.txt")), parse_uapi_get(_data("uapi_get_ipv4_far.txt"))
    p = near.peers[0]
    cfg = WgConfig(near.private_key, near.listen_port, WgPeer(p.public_key, p.preshared_key, ("2001:db8::2", 4511),
                                                              p.allowed_ips, p.keepalive))
    assert public_key(far.private_key) == cfg.peer.public_key
    assert f"endpoint={p.endpoint}\n".encode() in uapi_set(cfg)


# --- UAPI get: made-up replies --------------------------------------------------------------------

def _peer_lines(sec=0, nsec=0, psk="00" * 32) -> str:
    return (f"public_key={PEER_PUB.hex()}\npreshared_key={psk}\nprotocol_version=1\n"
            f"last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n"
            "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n")


def test_handshake_time_and_no_psk():
    dev = parse_uapi_get(f"private_key={PRIV.hex()}\nlisten_port=4500\n{_peer_lines(1700000000, 250000000)}errno=0\n\n")
    (p,) = dev.peers
    assert p.last_handshake == 1700000000.25
    assert p.preshared_key is None and p.endpoint is None and p.allowed_ips == ()
    assert dev == DeviceStatus(PRIV, 4500, 0, (p,))


def test_two_peers():
    text = f"listen_port=1\n{_peer_lines()}{_peer_lines(psk=PSK.hex()).replace(PEER_PUB.hex(), PRIV.hex())}errno=0\n"
    a, b = parse_uapi_get(text).peers
    assert (a.public_key, a.preshared_key, b.public_key, b.preshared_key) == (PEER_PUB, None, PRIV, PSK)


@pytest.mark.parametrize("text, code, name", [
    ("errno=-22\n\n", -22, "EINVAL"),
    ("listen_port=4500\nerrno=-5\n\n", -5, "EIO"),
])
def test_get_errno(text, code, name):
    with pytest.raises(UapiError) as e:
        parse_uapi_get(text)
    assert e.value.errno == code
    assert str(e.value) == f"wireguard-go could not report the device (errno {code}: {name})"


@pytest.mark.parametrize("text, what", [
    ("listen_port=1\nbogus_key=1\nerrno=0\n\n", "unexpected key 'bogus_key'"),
    (f"listen_port=1\n{_peer_lines()}bogus_peer_key=2\nerrno=0\n\n", "unexpected key 'bogus_peer_key'"),
    ("endpoint=192.0.2.2:1\nerrno=0\n\n", "unexpected key 'endpoint'"),  # a peer key before any peer
    (f"{_peer_lines()}listen_port=1\nerrno=0\n\n", "unexpected key 'listen_port'"),  # a device key after one
    ("listen_port=1\n", "ended before errno="),
    ("listen_port\nerrno=0\n\n", "has no '='"),
    ("listen_port=x\nerrno=0\n\n", "'x' is not a number"),
    ("private_key=abcd\nerrno=0\n\n", "private_key is not a 64-digit hex key"),
    ("errno=zero\n\n", "errno='zero'"),
])
def test_bad_get_replies(text, what):
    with pytest.raises(UapiError, match=what) as e:
        parse_uapi_get(text)
    assert e.value.errno == -71 and "\n" not in str(e.value)


def test_unknown_key_in_a_real_dump():
    text = _data("uapi_get_ipv4.txt").replace("protocol_version=1\n", "protocol_version=1\nfuture_key=3\n")
    with pytest.raises(UapiError, match="'future_key'"):
        parse_uapi_get(text)


# --- UAPI set replies ---------------------------------------------------------------------------

def test_set_reply_ok():
    assert parse_uapi_reply(_data("uapi_set_reply_ok.txt")) is None


@pytest.mark.parametrize("name, code, errname", [
    ("uapi_set_reply_unknown_key.txt", -22, "EINVAL"),
    ("uapi_set_reply_bad_key.txt", -22, "EINVAL"),
    ("uapi_set_reply_port_in_use.txt", -98, "EADDRINUSE"),
])
def test_set_reply_errors(name, code, errname):
    with pytest.raises(UapiError) as e:
        parse_uapi_reply(_data(name))
    assert e.value.errno == code
    assert str(e.value) == f"wireguard-go refused the configuration (errno {code}: {errname})"


@pytest.mark.parametrize("text", ["", "\n\n", "listen_port=1\nerrno=0\n\n", "errno=\n\n"])
def test_set_reply_unreadable(text):
    with pytest.raises(UapiError, match="unreadable reply from wireguard-go"):
        parse_uapi_reply(text)


# --- kernel (pyroute2) ----------------------------------------------------------------------------

def _set_message(kwargs: dict) -> wgmsg:
    """What WireGuard().set("wh-test", **kwargs) would send, built by pyroute2's own code and decoded."""
    inspect.signature(WireGuard.set).bind(None, "wh-test", **kwargs)
    wg = AsyncWireGuard.__new__(AsyncWireGuard)  # only its message-building helpers are used
    msg = wgmsg()
    msg["cmd"], msg["version"] = 1, 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "wh-test"])
    wg._wg_test_key(kwargs["private_key"])
    msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", kwargs["private_key"]])
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", kwargs["listen_port"]])
    wg._wg_set_peer(msg, kwargs["peer"])
    return _round_trip(msg)


def _round_trip(msg: wgmsg) -> wgmsg:
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def test_kernel_set_args():
    assert kernel_set_args(_config(("2001:db8::2", 4501), ("100.64.0.2",))) == {
        "private_key": b64(PRIV), "listen_port": 4500,
        "peer": {"public_key": b64(PEER_PUB), "preshared_key": b64(PSK), "endpoint_addr": "2001:db8::2",
                 "endpoint_port": 4501, "persistent_keepalive": 25, "replace_allowed_ips": True,
                 "allowed_ips": ["100.64.0.2/32"]}}
    assert "endpoint_addr" not in kernel_set_args(_config(None))["peer"]


@pytest.mark.parametrize("endpoint, shown", [(("192.0.2.2", 4501), "192.0.2.2:4501"),
                                             (("2001:db8::2", 4501), "[2001:db8::2]:4501"),
                                             (None, None)])
def test_kernel_set_args_through_pyroute2(endpoint, shown):
    cfg = _config(endpoint, ("100.64.0.2/32", "fd00::2/128"))
    msg = _set_message(kernel_set_args(cfg))
    (peer,) = msg.get_attr("WGDEVICE_A_PEERS")
    assert peer.get_attr("WGPEER_A_FLAGS") == 2  # WGPEER_F_REPLACE_ALLOWEDIPS
    dev = parse_kernel_info([msg])
    assert (dev.private_key, dev.listen_port) == (PRIV, 4500)
    (p,) = dev.peers
    assert (p.public_key, p.preshared_key, p.endpoint, p.keepalive) == (PEER_PUB, PSK, shown, 25)
    assert p.allowed_ips == ("100.64.0.2/32", "fd00::2/128")


def test_kernel_remove_args():
    other = bytes(range(100, 132))
    status = DeviceStatus(PRIV, 4500, 0, tuple(
        parse_uapi_get(f"{_peer_lines().replace(PEER_PUB.hex(), key.hex())}errno=0\n").peers[0]
        for key in (PEER_PUB, other)))
    assert kernel_remove_args(status, _config()) == [{"peer": {"public_key": b64(other), "remove": True}}]
    for kwargs in kernel_remove_args(status, _config()):
        inspect.signature(WireGuard.set).bind(None, "wh-test", **kwargs)


def _allowed(cidr: str) -> dict:
    addr, mask = cidr.split("/")
    family = AF_INET6 if ":" in addr else AF_INET
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family], ["WGALLOWEDIP_A_IPADDR", inet_pton(family, addr)],
                      ["WGALLOWEDIP_A_CIDR_MASK", int(mask)]]}


def _kernel_peer(key: bytes, allowed=(), endpoint=None, handshake=(0, 0), psk=bytes(32), traffic=(660, 752)) -> dict:
    attrs = [["WGPEER_A_PUBLIC_KEY", b64(key)], ["WGPEER_A_PRESHARED_KEY", b64(psk)]]
    if endpoint:
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": endpoint[0], "port": endpoint[1]}])
    attrs += [["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
              ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake[0], "tv_nsec": handshake[1]}],
              ["WGPEER_A_RX_BYTES", traffic[0]], ["WGPEER_A_TX_BYTES", traffic[1]],
              ["WGPEER_A_ALLOWEDIPS", [_allowed(c) for c in allowed]], ["WGPEER_A_PROTOCOL_VERSION", 1]]
    return {"attrs": attrs}


def _kernel_reply(peers: list[dict], device=True, private: bytes | None = PRIV, port=4500, fwmark=0x1234) -> wgmsg:
    """A WG_CMD_GET_DEVICE reply as the kernel sends it, decoded by pyroute2's wgmsg."""
    msg = wgmsg()
    msg["cmd"], msg["version"] = 0, 1
    if device:
        msg["attrs"] += [["WGDEVICE_A_LISTEN_PORT", port], ["WGDEVICE_A_FWMARK", fwmark],
                         ["WGDEVICE_A_IFINDEX", 7], ["WGDEVICE_A_IFNAME", "wh-0123456789"]]
        if private is not None:
            msg["attrs"] += [["WGDEVICE_A_PRIVATE_KEY", b64(private)],
                             ["WGDEVICE_A_PUBLIC_KEY", b64(public_key(private))]]
    msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
    return _round_trip(msg)


def test_parse_kernel_info():
    reply = _kernel_reply([_kernel_peer(PEER_PUB, ["100.64.0.2/32"], ("192.0.2.2", 4501),
                                        (1795263210, 704050902), PSK),
                           _kernel_peer(PSK, ["fd00::2/128"], ("2001:db8::2", 4511))])
    dev = parse_kernel_info([reply])
    assert (dev.private_key, dev.listen_port, dev.fwmark) == (PRIV, 4500, 0x1234)
    a, b = dev.peers
    assert a.endpoint == "192.0.2.2:4501" and b.endpoint == "[2001:db8::2]:4511"
    assert a.last_handshake == 1795263210 + 704050902 / 1e9 and b.last_handshake is None
    assert (a.preshared_key, b.preshared_key) == (PSK, None)
    assert (a.rx_bytes, a.tx_bytes, a.keepalive) == (660, 752, 25)
    assert (a.allowed_ips, b.allowed_ips) == (("100.64.0.2/32",), ("fd00::2/128",))


def test_parse_kernel_info_split_dump_and_no_private_key():
    """A dump over several messages: device attributes in the first, a peer continued in the next."""
    first = _kernel_reply([_kernel_peer(PEER_PUB, ["100.64.0.2/32"])], private=None)
    second = _kernel_reply([_kernel_peer(PEER_PUB, ["fd00::2/128"]), _kernel_peer(PSK)], device=False)
    dev = parse_kernel_info(iter([first, second]))
    assert dev.private_key is None and dev.listen_port == 4500
    assert [p.public_key for p in dev.peers] == [PEER_PUB, PSK]
    assert dev.peers[0].allowed_ips == ("100.64.0.2/32", "fd00::2/128") and dev.peers[0].endpoint is None


def test_parse_kernel_info_empty():
    dev = parse_kernel_info([_kernel_reply([])])
    assert dev.peers == () and dev.private_key == PRIV
    with pytest.raises(ValueError, match="no WireGuard device"):
        parse_kernel_info([])


def test_both_backends_agree():
    """The device of a real UAPI dump, as the kernel would report it, gives the same DeviceStatus."""
    text = _data("uapi_get_fwmark_two_allowed.txt")
    values = dict(line.split("=", 1) for line in text.splitlines() if line)
    uapi = parse_uapi_get(text)
    (p,) = uapi.peers
    host, port = p.endpoint[1:].split("]:")
    handshake = int(values["last_handshake_time_sec"]), int(values["last_handshake_time_nsec"])
    peer = _kernel_peer(p.public_key, p.allowed_ips, (host, int(port)), handshake, p.preshared_key,
                        traffic=(p.rx_bytes, p.tx_bytes))
    msg = _kernel_reply([peer], private=uapi.private_key, port=uapi.listen_port, fwmark=uapi.fwmark)
    assert parse_kernel_info([msg]) == uapi
