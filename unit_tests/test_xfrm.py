"""xfrm messages: struct sizes, encode/decode round trips through pyroute2, values, and the exact bytes
iproute2 sends for the same `ip xfrm` commands.

The data/xfrm_*.txt messages are real: captured from `ip xfrm` (iproute2 6.1) by
data/xfrm_capture.py under strace. The kernel they ran on has no ESP, so it refused the states, but
strace shows what was sent; the policies were accepted."""

import errno
import socket
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE
from pyroute2.netlink.exceptions import NetlinkError

from wormholed.tunnels import xfrm
from wormholed.tunnels.xfrm import (
    SELECTOR_SIZE,
    STRUCT_SIZES,
    USER_TMPL_SIZE,
    XFRM_INF,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_DELSA,
    XFRM_MSG_FLUSHSA,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_GETSA,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_NEWSA,
    XFRM_MSG_UPDPOLICY,
    XFRM_MSG_UPDSA,
    Algorithm,
    Encap,
    Policy,
    Selector,
    State,
    StateStatus,
    Xfrm,
    XfrmMarshal,
    algorithm_missing,
    del_policy,
    del_sa,
    dump_request,
    esp_missing,
    flush_sa,
    gcm_aes,
    new_policy,
    new_sa,
    parse_policy,
    parse_sa,
    xfrm_usersa_flush,
    xfrm_usersa_id,
    xfrm_usersa_info,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
)

DATA = Path(__file__).parent / "data"
AEAD_KEY = bytes.fromhex("0102030405060708090a0b0c0d0e0f1011121314")
CBC_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
HMAC_KEY = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
TYPES = {name: value for name, value in vars(xfrm).items() if name.startswith("XFRM_MSG_")}
FLAGS = {"NLM_F_REQUEST": NLM_F_REQUEST, "NLM_F_ACK": NLM_F_ACK}

SEL4 = Selector("10.1.0.0", "10.2.0.0", 24, 24)
SEL6 = Selector("fd00:1::", "fd00:2::", 64, 64)
STATE_AEAD = State("192.0.2.1", "192.0.2.2", 0x1000, 7, aead=gcm_aes(AEAD_KEY))
STATE_AEAD6 = State("2001:db8::1", "2001:db8::2", 0x3000, 8, aead=gcm_aes(AEAD_KEY))
STATE_CBC = State("192.0.2.1", "192.0.2.2", 0x2000, 9, crypt=Algorithm("cbc(aes)", CBC_KEY),
                  auth=Algorithm("hmac(sha256)", HMAC_KEY, trunc_bits=128), encap=Encap(4500, 4501))
POLICY4 = Policy(SEL4, "out", "192.0.2.1", "192.0.2.2", reqid=7, priority=1000)
POLICY6 = Policy(SEL6, "in", "2001:db8::2", "2001:db8::1", reqid=8, priority=2000)
POLICY6_OVER_4 = Policy(replace(SEL6, proto=socket.IPPROTO_TCP), "fwd", "192.0.2.2", "192.0.2.1", reqid=9)

# each capture, and the message our builders make for the same command
EQUIVALENT = {
    "policy_add_v4": lambda: new_policy(POLICY4),
    "policy_add_v6": lambda: new_policy(POLICY6),
    "policy_add_v6_over_v4": lambda: new_policy(POLICY6_OVER_4),
    "policy_update_v4": lambda: new_policy(POLICY4, update=True),
    "policy_delete_v4": lambda: del_policy(SEL4, "out"),
    "state_add_aead": lambda: new_sa(STATE_AEAD),
    "state_add_aead_v6": lambda: new_sa(STATE_AEAD6),
    "state_update_aead": lambda: new_sa(STATE_AEAD, update=True),
    "state_add_cbc_hmac_encap": lambda: new_sa(STATE_CBC),
    "state_delete": lambda: del_sa("192.0.2.2", 0x1000, socket.AF_INET, src="192.0.2.1"),
    "state_flush": lambda: flush_sa(),
}


def load_capture(name: str) -> dict:
    text = (DATA / f"xfrm_{name}.txt").read_text()
    head, _, payload = text.partition("payload:\n")
    fields = dict(line.split(": ", 1) for line in head.splitlines() if not line.startswith("#"))
    return {
        "command": fields["command"],
        "type": TYPES[fields["type"]],
        "flags": sum(FLAGS[f] for f in fields["flags"].split("|")),
        "length": int(fields["length"]),
        "payload": bytes.fromhex("".join(payload.split())),
    }


def encoded(msg) -> bytes:
    msg.encode()
    return bytes(msg.data)


def roundtrip(msg):
    """Encode msg, decode the bytes with a fresh message of the same class."""
    data = encoded(msg)
    back = type(msg)(data)
    back.decode()
    return back


def with_header(payload: bytes, msg_type: int, flags: int = NLM_F_MULTI, seq: int = 1) -> bytes:
    return struct.pack("IHHII", 16 + len(payload), msg_type, flags, seq, 4242) + payload


def decoded(cls, payload: bytes, msg_type: int, flags: int = NLM_F_MULTI):
    msg = cls(with_header(payload, msg_type, flags))
    msg.decode()
    return msg


# --- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,size", [
    (xfrm_usersa_info, 224), (xfrm_usersa_id, 24), (xfrm_userpolicy_info, 168), (xfrm_userpolicy_id, 64),
    (xfrm_usersa_flush, 1),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_message_struct_sizes_match_the_kernel(cls, size):
    """sizeof() on x86_64 (gcc, linux/xfrm.h); the empty message is the header and the struct."""
    assert STRUCT_SIZES[cls] == size
    assert 16 + size == len(encoded(cls()))
    assert sum(struct.calcsize(fmt) for _, fmt in cls.fields) == size


def test_nested_struct_sizes_match_the_kernel():
    assert SELECTOR_SIZE == 56
    assert USER_TMPL_SIZE == 64


def test_field_offsets_of_usersa_info():
    """Offsets from gcc's offsetof() on x86_64: the padding sits where the compiler puts it."""
    offsets, offset = {}, 0
    for name, fmt in xfrm_usersa_info.fields:
        offsets[name] = offset
        offset += struct.calcsize(fmt)
    assert offsets["sel_family"] == 40
    assert offsets["sel_ifindex"] == 48
    assert offsets["id_daddr"] == 56
    assert offsets["saddr"] == 80
    assert offsets["lft_soft_byte_limit"] == 96
    assert offsets["curlft_bytes"] == 160
    assert offsets["stats_replay_window"] == 192
    assert offsets["seq"] == 204
    assert offsets["family"] == 212
    assert offsets["flags"] == 216


def test_attribute_sizes_match_the_kernel():
    # nla header 4 + struct xfrm_algo_aead 72 + key; xfrm_algo 68; xfrm_algo_auth 72; xfrm_encap_tmpl 24
    msg = roundtrip(new_sa(STATE_CBC))
    assert [(s.name, s.nla.length) for s in msg["attrs"]] == [
        ("XFRMA_ALG_AUTH_TRUNC", 4 + 72 + 32), ("XFRMA_ALG_CRYPT", 4 + 68 + 16), ("XFRMA_ENCAP", 4 + 24)]
    aead = roundtrip(new_sa(STATE_AEAD))
    assert [(s.name, s.nla.length) for s in aead["attrs"]] == [("XFRMA_ALG_AEAD", 4 + 72 + 20)]
    tmpl = roundtrip(new_policy(POLICY4))
    assert [(s.name, s.nla.length) for s in tmpl["attrs"]] == [("XFRMA_TMPL", 4 + 64)]


# --- the bytes iproute2 sends --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_message_is_what_iproute2_sends(name):
    capture = load_capture(name)
    data = encoded(EQUIVALENT[name]())
    length, msg_type, flags = struct.unpack_from("IHH", data)
    assert (msg_type, flags) == (capture["type"], capture["flags"]), capture["command"]
    assert length == capture["length"] == len(data)
    assert data[16:].hex() == capture["payload"].hex(), capture["command"]


def test_every_capture_is_pinned():
    captured = {p.stem.removeprefix("xfrm_") for p in DATA.glob("xfrm_*.txt")}
    assert captured == set(EQUIVALENT)


@pytest.mark.parametrize("name,expected", [
    ("state_add_aead", STATE_AEAD),
    ("state_add_aead_v6", STATE_AEAD6),
    ("state_add_cbc_hmac_encap", STATE_CBC),
])
def test_states_iproute2_built_parse_to_the_same_values(name, expected):
    capture = load_capture(name)
    status = parse_sa(decoded(xfrm_usersa_info, capture["payload"], capture["type"]))
    assert status == StateStatus(expected)


@pytest.mark.parametrize("name,expected", [
    ("policy_add_v4", POLICY4),
    ("policy_add_v6", POLICY6),
    ("policy_add_v6_over_v4", POLICY6_OVER_4),
])
def test_policies_iproute2_built_parse_to_the_same_values(name, expected):
    capture = load_capture(name)
    assert parse_policy(decoded(xfrm_userpolicy_info, capture["payload"], capture["type"])) == expected


# --- round trips through pyroute2 ----------------------------------------------------------------

STATES = [
    STATE_AEAD,
    STATE_AEAD6,
    STATE_CBC,
    State("2001:db8::1", "2001:db8::2", 0xFFFFFFFF, 0xFFFFFFFF, aead=Algorithm("rfc4106(gcm(aes))", bytes(36),
                                                                               icv_bits=96),
          encap=Encap(65535, 1), replay_window=0),
    State("192.0.2.1", "192.0.2.2", 0x100, 1, aead=gcm_aes(AEAD_KEY), sel=Selector("10.1.0.1", "10.2.0.1", 32, 32)),
    State("192.0.2.1", "192.0.2.2", 0x101, 1, aead=gcm_aes(AEAD_KEY), sel=SEL6),
]


@pytest.mark.parametrize("state", STATES, ids=lambda s: f"{s.src}-{s.spi:#x}")
def test_state_round_trip(state):
    msg = roundtrip(new_sa(state))
    assert msg["header"]["type"] == XFRM_MSG_NEWSA
    assert msg["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK
    assert parse_sa(msg) == StateStatus(state)


def test_state_fields_as_decoded_by_pyroute2():
    msg = roundtrip(new_sa(STATE_CBC, update=True))
    assert msg["header"]["type"] == XFRM_MSG_UPDSA
    assert msg["id_daddr"] == bytes([192, 0, 2, 2]) + bytes(12)
    assert msg["saddr"] == bytes([192, 0, 2, 1]) + bytes(12)
    assert (msg["id_spi"], msg["id_proto"], msg["family"], msg["mode"]) == (0x2000, 50, socket.AF_INET, 1)
    assert (msg["reqid"], msg["replay_window"], msg["flags"]) == (9, 32, 0)
    assert [msg[f"lft_{n}"] for n in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit",
                                      "hard_packet_limit")] == [XFRM_INF] * 4
    assert [msg[f"lft_{n}"] for n in ("soft_add_expires_seconds", "hard_add_expires_seconds",
                                      "soft_use_expires_seconds", "hard_use_expires_seconds")] == [0] * 4
    assert msg["sel_family"] == 0  # the kernel gives an empty selector the state's family
    auth = msg.get_attr("XFRMA_ALG_AUTH_TRUNC")
    assert auth["alg_name"].rstrip(b"\0") == b"hmac(sha256)"
    assert (auth["alg_key_len"], auth["alg_trunc_len"], auth["alg_key"]) == (256, 128, HMAC_KEY)
    crypt = msg.get_attr("XFRMA_ALG_CRYPT")
    assert (crypt["alg_name"].rstrip(b"\0"), crypt["alg_key_len"], crypt["alg_key"]) == (b"cbc(aes)", 128, CBC_KEY)
    encap = msg.get_attr("XFRMA_ENCAP")
    assert (encap["encap_type"], encap["encap_sport"], encap["encap_dport"], encap["encap_oa"]) == \
        (2, 4500, 4501, bytes(16))


POLICIES = [
    POLICY4,
    POLICY6,
    POLICY6_OVER_4,
    Policy(Selector("0.0.0.0", "0.0.0.0", 0, 0), "out", None, None, priority=5, action="block"),
    Policy(Selector("10.9.0.1", "10.9.0.2", 32, 32, proto=17), "fwd", None, None),
    Policy(SEL4, "in", "192.0.2.2", "192.0.2.1", reqid=0xFFFFFFFF, priority=0xFFFFFFFF),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.sel}-{p.dir}-{p.action}")
def test_policy_round_trip(policy):
    msg = roundtrip(new_policy(policy))
    assert msg["header"]["type"] == XFRM_MSG_NEWPOLICY
    assert parse_policy(msg) == policy


def test_policy_fields_as_decoded_by_pyroute2():
    msg = roundtrip(new_policy(POLICY6_OVER_4, update=True))
    assert msg["header"]["type"] == XFRM_MSG_UPDPOLICY
    assert (msg["sel_family"], msg["sel_prefixlen_s"], msg["sel_prefixlen_d"], msg["sel_proto"]) == \
        (socket.AF_INET6, 64, 64, 6)
    assert msg["sel_saddr"] == socket.inet_pton(socket.AF_INET6, "fd00:1::")
    assert (msg["dir"], msg["action"], msg["priority"], msg["index"], msg["share"]) == (2, 0, 0, 0, 0)
    [tmpls] = msg.get_attrs("XFRMA_TMPL")
    assert tmpls == [{
        "id_daddr": bytes([192, 0, 2, 1]) + bytes(12), "id_spi": 0, "id_proto": 50, "family": socket.AF_INET,
        "saddr": bytes([192, 0, 2, 2]) + bytes(12), "reqid": 9, "mode": 1, "share": 0, "optional": 0,
        "aalgos": 0xFFFFFFFF, "ealgos": 0xFFFFFFFF, "calgos": 0xFFFFFFFF,
    }]


def test_delete_messages_round_trip():
    sa = roundtrip(del_sa("2001:db8::2", 0x3000))
    assert sa["header"]["type"] == XFRM_MSG_DELSA
    assert (sa["daddr"], sa["spi"], sa["family"], sa["proto"]) == \
        (socket.inet_pton(socket.AF_INET6, "2001:db8::2"), 0x3000, socket.AF_INET6, 50)
    assert sa.get_attr("XFRMA_SRCADDR") == bytes(16)
    pol = roundtrip(del_policy(SEL6, "in"))
    assert pol["header"]["type"] == XFRM_MSG_DELPOLICY
    assert (pol["sel_family"], pol["sel_prefixlen_d"], pol["dir"], pol["index"]) == (socket.AF_INET6, 64, 0, 0)
    flush = roundtrip(flush_sa(50))
    assert (flush["header"]["type"], flush["proto"]) == (XFRM_MSG_FLUSHSA, 50)


def test_dump_requests_have_no_payload():
    for msg_type in (XFRM_MSG_GETSA, XFRM_MSG_GETPOLICY):
        data = encoded(dump_request(msg_type))
        assert struct.unpack("IHH", data[:8]) == (16, msg_type, NLM_F_REQUEST | NLM_F_DUMP)
    with pytest.raises(ValueError):
        dump_request(XFRM_MSG_NEWSA)


# --- what the kernel dumps -----------------------------------------------------------------------

def kernel_dump_of(state: State, *, bytes_=0, packets=0, extra_attrs=()) -> bytes:
    """A state as a GETSA dump carries it: counters, the selector family filled in, XFRMA_ALG_AUTH
    beside XFRMA_ALG_AUTH_TRUNC, XFRMA_LASTUSED and XFRMA_REPLAY_VAL."""
    msg = new_sa(state)
    msg["header"]["flags"] = NLM_F_MULTI
    msg["header"]["sequence_number"] = 1
    msg["sel_family"] = state.family
    msg["curlft_bytes"], msg["curlft_packets"] = bytes_, packets
    msg["curlft_add_time"], msg["curlft_use_time"] = 1_700_000_000, 1_700_000_100
    msg["stats_replay"], msg["stats_integrity_failed"], msg["stats_replay_window"] = 3, 4, 32
    attrs = list(msg["attrs"])
    if state.auth:
        attrs.append(("XFRMA_ALG_AUTH", {"alg_name": state.auth.name, "alg_key_len": len(state.auth.key) * 8,
                                         "alg_key": state.auth.key}))
    attrs += [("XFRMA_LASTUSED", 1_700_000_100), ("XFRMA_REPLAY_VAL", {"oseq": 10, "seq": 9, "bitmap": 0xFF}),
              *extra_attrs]
    msg["attrs"] = attrs
    return encoded(msg)


def test_parse_sa_reads_the_counters_of_a_dumped_state():
    data = kernel_dump_of(STATE_CBC, bytes_=123456789012, packets=98765)
    msg = xfrm_usersa_info(data)
    msg.decode()
    assert msg.get_attr("XFRMA_LASTUSED") == 1_700_000_100
    assert msg.get_attr("XFRMA_REPLAY_VAL")["oseq"] == 10
    assert parse_sa(msg) == StateStatus(STATE_CBC, bytes=123456789012, packets=98765, add_time=1_700_000_000,
                                        use_time=1_700_000_100, replay=3, integrity_failed=4)


def test_marshal_reads_a_dump_stream():
    """What Xfrm.states()/policies() get from the socket: several messages, then NLMSG_DONE."""
    stream = (kernel_dump_of(STATE_AEAD, bytes_=1, packets=1) + kernel_dump_of(STATE_CBC, bytes_=2, packets=2)
              + with_header(struct.pack("i", 0), NLMSG_DONE))
    msgs = list(XfrmMarshal().parse(stream, 1))
    assert [type(m).__name__ for m in msgs[:2]] == ["xfrm_usersa_info"] * 2
    assert msgs[2]["header"]["type"] == NLMSG_DONE
    assert [(s.state.spi, s.bytes) for s in map(parse_sa, msgs[:2])] == [(0x1000, 1), (0x2000, 2)]
    policy = encoded(new_policy(POLICY6))
    [pmsg] = XfrmMarshal().parse(policy, 0)
    assert type(pmsg).__name__ == "xfrm_userpolicy_info" and parse_policy(pmsg) == POLICY6


def test_marshal_turns_a_kernel_refusal_into_a_netlink_error():
    request = encoded(new_sa(STATE_CBC))
    payload = struct.pack("i", -errno.EPROTONOSUPPORT) + request
    reply = with_header(payload, 2, 0)  # NLMSG_ERROR, echoing the request
    [msg] = XfrmMarshal().parse(reply, 1)
    error = msg["header"]["error"]
    assert isinstance(error, NetlinkError) and error.code == errno.EPROTONOSUPPORT
    assert esp_missing(error)


# --- parsers refuse what the values cannot say ---------------------------------------------------

@pytest.mark.parametrize("change,words", [
    (lambda m: m.__setitem__("id_proto", 51), "not ESP"),
    (lambda m: m.__setitem__("mode", 0), "not tunnel"),
    (lambda m: m["attrs"].append(("XFRMA_MARK", {"v": 1, "m": 0xFFFFFFFF})), "mark"),
    (lambda m: m["attrs"].append(("XFRMA_IF_ID", 5)), "interface id"),
    (lambda m: m["attrs"].append(("XFRMA_ALG_COMP", {"alg_name": "deflate", "alg_key_len": 0, "alg_key": b""})),
     "compression"),
    (lambda m: m.__setitem__("replay_window", 64), "replay_window"),
])
def test_parse_sa_refuses_states_it_cannot_express(change, words):
    msg = new_sa(STATE_AEAD)
    change(msg)
    with pytest.raises(ValueError, match=words):
        parse_sa(roundtrip(msg))


def test_parse_sa_refuses_other_encapsulations():
    msg = new_sa(STATE_CBC)
    msg["attrs"][-1][1]["encap_type"] = 1
    with pytest.raises(ValueError, match="not ESP-in-UDP"):
        parse_sa(roundtrip(msg))


def test_parse_policy_refuses_policies_it_cannot_express():
    two = new_policy(POLICY4)
    tmpl = two["attrs"][0][1][0]
    two["attrs"] = [("XFRMA_TMPL", [tmpl, dict(tmpl)])]
    with pytest.raises(ValueError, match="2 templates"):
        parse_policy(roundtrip(two))
    transport = new_policy(POLICY4)
    transport["attrs"][0][1][0]["mode"] = 0
    with pytest.raises(ValueError, match="not a plain ESP tunnel"):
        parse_policy(roundtrip(transport))
    marked = new_policy(POLICY4)
    marked["attrs"].append(("XFRMA_MARK", {"v": 1, "m": 1}))
    with pytest.raises(ValueError, match="mark"):
        parse_policy(roundtrip(marked))
    ported = new_policy(POLICY4)
    ported["sel_dport"], ported["sel_dport_mask"] = 443, 0xFFFF
    with pytest.raises(ValueError, match="dport"):
        parse_policy(roundtrip(ported))
    sub = new_policy(POLICY4)
    sub["attrs"].append(("XFRMA_POLICY_TYPE", {"type": 1}))
    with pytest.raises(ValueError, match="sub policies"):
        parse_policy(roundtrip(sub))


# --- values --------------------------------------------------------------------------------------

def test_addresses_are_canonical():
    assert Selector("FD00:1:0::", "fd00:2::0", 64, 64) == SEL6
    assert State("2001:DB8::1", "2001:db8:0::2", 0x3000, 8, aead=gcm_aes(AEAD_KEY)) == STATE_AEAD6
    assert Policy(SEL6, "in", "2001:DB8::2", "2001:db8::1", reqid=8, priority=2000) == POLICY6
    assert SEL4.family == socket.AF_INET and SEL6.family == socket.AF_INET6
    assert POLICY6_OVER_4.tmpl_family == socket.AF_INET


@pytest.mark.parametrize("build,words", [
    (lambda: Selector("10.0.0.1", "fd00::1", 32, 128), "mixes IPv4 and IPv6"),
    (lambda: Selector("10.0.0.1", "10.0.0.2", 33, 32), "src_len must be 0..32"),
    (lambda: Selector("10.0.0.1", "10.0.0.2", 32, 32, proto=256), "proto must be 0..255"),
    (lambda: Selector("10.0.0.300", "10.0.0.2", 32, 32), "not an IP address"),
    (lambda: Algorithm("x" * 64, b""), "1..63 ASCII"),
    (lambda: Algorithm("cbc(aes)", "key"), "must be bytes"),
    (lambda: Algorithm("x", b"k", icv_bits=128, trunc_bits=96), "exclude each other"),
    (lambda: Algorithm("x", b"k", icv_bits=0), "icv_bits must be an integer from 1"),
    (lambda: gcm_aes(bytes(16)), "needs 20 key bytes"),
    (lambda: Encap(0, 4500), "sport must be a port"),
    (lambda: Encap(4500, 65536), "dport must be a port"),
    (lambda: State("192.0.2.1", "2001:db8::2", 1, 1, aead=gcm_aes(AEAD_KEY)), "mixes IPv4 and IPv6"),
    (lambda: replace(STATE_AEAD, spi=0), "spi must be an integer from 1"),
    (lambda: replace(STATE_AEAD, spi=2**32), "spi must be"),
    (lambda: replace(STATE_AEAD, reqid=-1), "reqid must be"),
    (lambda: replace(STATE_AEAD, mode="transport"), "mode must be 'tunnel'"),
    (lambda: replace(STATE_AEAD, replay_window=33), "replay_window must be 0..32"),
    (lambda: replace(STATE_AEAD, aead=None), "needs an AEAD or a cipher"),
    (lambda: replace(STATE_AEAD, crypt=Algorithm("cbc(aes)", CBC_KEY)), "AEAD excludes crypt and auth"),
    (lambda: replace(STATE_AEAD, aead=Algorithm("rfc4106(gcm(aes))", AEAD_KEY)), "needs icv_bits"),
    (lambda: replace(STATE_CBC, auth=None), "unauthenticated ESP"),
    (lambda: replace(STATE_CBC, auth=Algorithm("hmac(sha256)", HMAC_KEY)), "needs trunc_bits"),
    (lambda: replace(STATE_CBC, crypt=Algorithm("cbc(aes)", CBC_KEY, trunc_bits=96)), "neither icv_bits"),
    (lambda: replace(STATE_AEAD, encap=(4500, 4500)), "encap must be an Encap"),
    (lambda: replace(POLICY4, dir="both"), "dir must be one of in, out, fwd"),
    (lambda: replace(POLICY4, action="drop"), "action must be allow or block"),
    (lambda: replace(POLICY4, tmpl_dst=None), "both tmpl_src and tmpl_dst"),
    (lambda: replace(POLICY4, tmpl_dst="2001:db8::1"), "mixes IPv4 and IPv6"),
    (lambda: replace(POLICY4, priority=2**32), "priority must be"),
    (lambda: Policy("10.0.0.0/8", "out", None, None), "must be a Selector"),
    (lambda: del_policy(SEL4, "up"), "dir must be one of"),
    (lambda: del_sa("192.0.2.2", 0x1000, socket.AF_INET6), "not of family"),
    (lambda: del_sa("192.0.2.2", 0), "spi must be"),
    (lambda: flush_sa(300), "flush proto"),
])
def test_invalid_values_are_refused_in_one_line(build, words):
    with pytest.raises(ValueError, match=words) as info:
        build()
    assert "\n" not in str(info.value)


def test_algorithm_repr_hides_the_key():
    text = repr(STATE_CBC)
    assert HMAC_KEY.hex() not in text and repr(HMAC_KEY) not in text and repr(CBC_KEY) not in text
    assert "<32 key bytes>" in text and "trunc_bits=128" in text


# --- errors and the shell ------------------------------------------------------------------------

def test_esp_and_algorithm_missing_are_recognised():
    assert esp_missing(NetlinkError(errno.EPROTONOSUPPORT, "Requested type not found"))
    assert esp_missing(OSError(errno.EPROTONOSUPPORT, "xfrm state add ..."))
    assert not esp_missing(OSError(errno.EEXIST, "exists"))
    assert not esp_missing(ValueError("x"))
    assert algorithm_missing(NetlinkError(errno.ENOSYS, "Requested AEAD algorithm not found"))
    assert not algorithm_missing(NetlinkError(errno.EPROTONOSUPPORT))


class FakeSocket:
    def __init__(self, replies=(), error=None):
        self.replies, self.error, self.sent = list(replies), error, []

    def nlm_request(self, msg, msg_type, msg_flags):
        self.sent.append((msg, msg_type, msg_flags))
        if self.error:
            raise self.error
        return iter(self.replies)


def shell(sock: FakeSocket) -> Xfrm:
    x = Xfrm.__new__(Xfrm)
    x._sock = sock
    return x


def test_shell_turns_kernel_refusals_into_oserror_naming_the_request():
    sock = FakeSocket(error=NetlinkError(errno.EPROTONOSUPPORT, "Requested type not found"))
    with pytest.raises(OSError) as info:
        shell(sock).add_state(STATE_CBC)
    assert info.value.errno == errno.EPROTONOSUPPORT and esp_missing(info.value)
    assert str(info.value) == ("[Errno 93] xfrm state add 192.0.2.1 -> 192.0.2.2 spi 0x2000:"
                               " Requested type not found (EPROTONOSUPPORT)")
    [(msg, msg_type, flags)] = sock.sent
    assert (msg_type, flags) == (XFRM_MSG_NEWSA, NLM_F_REQUEST | NLM_F_ACK)


def test_shell_sends_what_the_builders_make():
    sock = FakeSocket()
    x = shell(sock)
    x.add_state(STATE_AEAD, update=True)
    x.delete_state("192.0.2.2", 0x1000)
    x.add_policy(POLICY4)
    x.add_policy(POLICY4, update=True)
    x.delete_policy(SEL4, "out")
    x.flush_states()
    assert [(t, f) for _, t, f in sock.sent] == [
        (XFRM_MSG_UPDSA, NLM_F_REQUEST | NLM_F_ACK), (XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK),
        (XFRM_MSG_NEWPOLICY, NLM_F_REQUEST | NLM_F_ACK), (XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK),
        (XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK), (XFRM_MSG_FLUSHSA, NLM_F_REQUEST | NLM_F_ACK)]
    assert sock.sent[-1][0]["proto"] == 50


def test_shell_lists_what_it_can_express_and_leaves_the_rest_out():
    foreign = new_sa(STATE_AEAD)
    foreign["mode"] = 0  # transport mode: someone else's
    replies = list(XfrmMarshal().parse(kernel_dump_of(STATE_CBC, bytes_=5, packets=1)
                                       + encoded(foreign), 1))
    states = shell(FakeSocket(replies)).states()
    assert states == [StateStatus(STATE_CBC, bytes=5, packets=1, add_time=1_700_000_000, use_time=1_700_000_100,
                                  replay=3, integrity_failed=4)]
    block = Policy(SEL4, "fwd", None, None, action="block")
    two = new_policy(POLICY6)
    two["attrs"] = [("XFRMA_TMPL", two["attrs"][0][1] * 2)]
    replies = list(XfrmMarshal().parse(encoded(new_policy(POLICY4)) + encoded(two) + encoded(new_policy(block)), 0))
    assert shell(FakeSocket(replies)).policies() == [POLICY4, block]
    sock = FakeSocket()
    assert shell(sock).states() == [] and shell(sock).policies() == []
    assert [(t, f) for _, t, f in sock.sent] == [(XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP),
                                                 (XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP)]
