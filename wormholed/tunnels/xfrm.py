"""IPsec through the kernel's xfrm (NETLINK_XFRM): ESP tunnel-mode states (SAs) and policies.

pyroute2 has no xfrm API, so the messages are declared here on its netlink
classes, laid out as in the kernel's include/uapi/linux/xfrm.h (x86_64 sizes:
xfrm_usersa_info 224 bytes, xfrm_userpolicy_info 168, xfrm_usersa_id 24,
xfrm_userpolicy_id 64, xfrm_user_tmpl 64; the unit tests pin them and pin whole
messages against what iproute2's `ip xfrm` sends for the same command). The
padding is that of ABIs aligning u64 to 8 bytes (x86_64, arm64, and most
others); i386, where u64 aligns to 4 and xfrm_usersa_info is 220 bytes, is
not supported.

Pure core, thin shell. Values (Selector, Algorithm, Encap, State, Policy) are
frozen and checked when built; builders (new_sa, del_sa, new_policy,
del_policy, flush_sa) turn them into messages and parsers (parse_sa,
parse_policy) read back what the kernel dumps, without I/O. `Xfrm` is the only
part that talks to the kernel: synchronous, for a worker thread (pyroute2 runs
its own event loop; never call it from a thread running an asyncio loop).

What is supported is what a tunnel between two wormhole daemons needs: ESP in
tunnel mode, optionally inside UDP (ESP-in-UDP, RFC 3948, UDP_ENCAP_ESPINUDP),
lifetimes unlimited (XFRM_INF byte and packet limits, no time limits, as `ip
xfrm` sets them; keys are replaced by the daemon, not expired by the kernel),
the 32-packet replay window of the plain (non-ESN) replay state, one ESP
tunnel template per policy, no marks or interface ids. States and policies
the kernel holds that fall outside this (another IKE daemon's, say) are left
out by states() and policies() and refused by the parsers.

Algorithms. The default is AEAD rfc4106(gcm(aes)) with a 128-bit AES key (20
key bytes: 16 of key and 4 of salt) and a 128-bit ICV: one pass both encrypts
and authenticates, and AES-GCM is accelerated by AES-NI/PCLMUL (x86) and the
ARMv8 crypto extensions, so it is the fastest authenticated ESP transform on
current hardware. cbc(aes) with hmac(sha256) truncated to 128 bits (RFC 4868),
which the original tool used, is supported (crypt + auth) but not the default:
two passes, slower, and ESP with encryption but no authentication is refused.

Errors. The kernel's errno comes back as OSError (its message names what was
asked). A kernel without the ESP transform (the esp4/esp6 module) refuses a
new state with EPROTONOSUPPORT ("Requested type not found"): esp_missing(exc)
recognises it. An algorithm the kernel's crypto API lacks (gcm not built, for
instance) is ENOSYS ("Requested AEAD algorithm not found"): algorithm_missing(exc).
The kernel looks the algorithms up before the ESP type, so a kernel lacking
both answers ENOSYS."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink import (
    NETLINK_XFRM,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NotInitialized,
    nla,
    nla_base_string,
    nlmsg,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkSocket

# --- constants (include/uapi/linux/xfrm.h, linux/in.h, linux/udp.h) ------------------------------

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D

XFRM_INF = 2**64 - 1
IPPROTO_ESP = 50
XFRM_MODE_TUNNEL = 1
UDP_ENCAP_ESPINUDP = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_SHARE_ANY = 0
ALL_ALGOS = 0xFFFFFFFF  # a template's aalgos/ealgos/calgos: any algorithm

DIRS = {"in": 0, "out": 1, "fwd": 2}
ACTIONS = {"allow": XFRM_POLICY_ALLOW, "block": XFRM_POLICY_BLOCK}

AEAD_GCM_AES = "rfc4106(gcm(aes))"
AEAD_GCM_KEY_LEN = 20  # 16 bytes of AES-128 key + 4 bytes of salt (RFC 4106)
AEAD_GCM_ICV_BITS = 128
REPLAY_WINDOW_MAX = 32  # the plain replay state's bitmap; larger windows need ESN

ALG_NAME_MAX = 63  # char alg_name[64], NUL-terminated

_REQUEST_ACK = NLM_F_REQUEST | NLM_F_ACK

# --- struct layouts ------------------------------------------------------------------------------
# Fields are (name, struct format) in kernel order, with explicit padding ("__pad", "Nx") where the
# C compiler aligns, so that the flat pyroute2 field lists have the kernel's sizes and offsets.

ADDR = "16s"  # xfrm_address_t: the IPv4 address in the first 4 bytes, or the IPv6 address

_SELECTOR = (
    ("daddr", ADDR), ("saddr", ADDR),
    ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
    ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"), ("__pad", "3x"),
    ("ifindex", "i"), ("user", "I"),
)  # struct xfrm_selector, 56 bytes

_ID = (("daddr", ADDR), ("spi", ">I"), ("proto", "B"), ("__pad", "3x"))  # struct xfrm_id, 24

_LIFETIME_CFG = tuple((name, "Q") for name in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))  # struct xfrm_lifetime_cfg, 64

_LIFETIME_CUR = tuple((name, "Q") for name in ("bytes", "packets", "add_time", "use_time"))  # 32

_STATS = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))  # struct xfrm_stats, 12


def _prefixed(prefix: str, fields: tuple) -> tuple:
    return tuple((name if name.startswith("__") else prefix + name, fmt) for name, fmt in fields)


_USER_TMPL = _prefixed("id_", _ID) + (
    ("family", "H"), ("__pad", "2x"), ("saddr", ADDR), ("reqid", "I"),
    ("mode", "B"), ("share", "B"), ("optional", "B"), ("__pad", "1x"),
    ("aalgos", "I"), ("ealgos", "I"), ("calgos", "I"),
)  # struct xfrm_user_tmpl, 64


def _zero_strings(fields: tuple) -> dict:
    """pyroute2 encodes an unset field as 0, which a bytes field refuses: default those to zeros."""
    return {name: bytes(struct.calcsize(fmt) if fmt != "s" else 0) for name, fmt in fields if fmt.endswith("s")}


def _size(fields: tuple) -> int:
    return sum(struct.calcsize(fmt) for _, fmt in fields)


def _pack(fields: tuple, values: dict) -> bytes:
    out = bytearray()
    for name, fmt in fields:
        out += struct.pack(fmt) if fmt.endswith("x") else struct.pack(fmt, values.get(name, 0))
    return bytes(out)


def _unpack(fields: tuple, data: bytes, offset: int = 0) -> dict:
    values = {}
    for name, fmt in fields:
        if not fmt.endswith("x"):
            values[name] = struct.unpack_from(fmt, data, offset)[0]
        offset += struct.calcsize(fmt)
    return values


# --- messages ------------------------------------------------------------------------------------

class _keyed_algo(nla):
    """struct xfrm_algo and kin: fixed fields, then alg_key, as long as the attribute is."""

    __slots__ = ()

    def ft_decode(self, offset):
        for name, fmt in self.fields[:-1]:
            self[name], offset = self.decode_field(fmt, self.data, offset)
        self["alg_key"] = bytes(self.data[offset:self.offset + self.length])
        del self["attrs"]
        if self["value"] is NotInitialized:
            del self["value"]


class xfrm_msg(nlmsg):
    """Base of the xfrm messages: the XFRMA_* attributes, in the kernel's enum order."""

    __slots__ = ()

    nla_map = (
        ("XFRMA_UNSPEC", "none"),
        ("XFRMA_ALG_AUTH", "xfrm_algo"),
        ("XFRMA_ALG_CRYPT", "xfrm_algo"),
        ("XFRMA_ALG_COMP", "xfrm_algo"),
        ("XFRMA_ENCAP", "xfrm_encap_tmpl"),
        ("XFRMA_TMPL", "xfrm_user_tmpls"),
        ("XFRMA_SA", "cdata"),
        ("XFRMA_POLICY", "cdata"),
        ("XFRMA_SEC_CTX", "cdata"),
        ("XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        ("XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        ("XFRMA_REPLAY_THRESH", "uint32"),
        ("XFRMA_ETIMER_THRESH", "uint32"),
        ("XFRMA_SRCADDR", "xfrm_address"),
        ("XFRMA_COADDR", "xfrm_address"),
        ("XFRMA_LASTUSED", "uint64"),
        ("XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        ("XFRMA_MIGRATE", "cdata"),
        ("XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        ("XFRMA_KMADDRESS", "cdata"),
        ("XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        ("XFRMA_MARK", "xfrm_mark"),
        ("XFRMA_TFCPAD", "uint32"),
        ("XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        ("XFRMA_SA_EXTRA_FLAGS", "uint32"),
        ("XFRMA_PROTO", "uint8"),
        ("XFRMA_ADDRESS_FILTER", "cdata"),
        ("XFRMA_PAD", "none"),
        ("XFRMA_OFFLOAD_DEV", "cdata"),
        ("XFRMA_SET_MARK", "uint32"),
        ("XFRMA_SET_MARK_MASK", "uint32"),
        ("XFRMA_IF_ID", "uint32"),
        ("XFRMA_MTIMER_THRESH", "uint32"),
        ("XFRMA_SA_DIR", "uint8"),
        ("XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
        ("XFRMA_SA_PCPU", "uint32"),
    )

    class xfrm_algo(_keyed_algo):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_key", "s"))

    class xfrm_algo_auth(_keyed_algo):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"), ("alg_key", "s"))

    class xfrm_algo_aead(_keyed_algo):
        __slots__ = ()
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"), ("alg_key", "s"))

    class xfrm_encap_tmpl(nla):
        __slots__ = ()
        fields = (("encap_type", "H"), ("encap_sport", ">H"), ("encap_dport", ">H"), ("__pad", "2x"),
                  ("encap_oa", ADDR))
        defaults = _zero_strings(fields)

    class xfrm_user_tmpls(nla_base_string):
        """XFRMA_TMPL: an array of struct xfrm_user_tmpl; the value is a list of dicts."""

        __slots__ = ()

        def encode(self):
            self["value"] = b"".join(_pack(_USER_TMPL, t) for t in self.value)
            nla_base_string.encode(self)

        def decode(self):
            nla_base_string.decode(self)
            raw, size = self["value"], _size(_USER_TMPL)
            self.value = [_unpack(_USER_TMPL, raw, i) for i in range(0, len(raw) - size + 1, size)]
            del self["header"]

    class xfrm_address(nla):
        __slots__ = ()
        fields = (("value", ADDR),)

    class xfrm_lifetime_cur(nla):
        __slots__ = ()
        fields = _LIFETIME_CUR

    class xfrm_replay_state(nla):
        __slots__ = ()
        fields = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))

    class xfrm_replay_state_esn(nla):
        __slots__ = ()
        fields = (("bmp_len", "I"), ("oseq", "I"), ("seq", "I"), ("oseq_hi", "I"), ("seq_hi", "I"),
                  ("replay_window", "I"))

    class xfrm_userpolicy_type(nla):
        __slots__ = ()
        fields = (("type", "B"), ("__pad", "1x"), ("reserved1", "H"), ("reserved2", "B"), ("__pad", "1x"))

    class xfrm_mark(nla):
        __slots__ = ()
        fields = (("v", "I"), ("m", "I"))


def _zeroed(cls):
    cls.defaults = _zero_strings(cls.fields)
    return cls


@_zeroed
class xfrm_usersa_info(xfrm_msg):
    """XFRM_MSG_NEWSA / UPDSA, and each state of a GETSA dump."""

    __slots__ = ()
    fields = (_prefixed("sel_", _SELECTOR) + _prefixed("id_", _ID) + (("saddr", ADDR),)
              + _prefixed("lft_", _LIFETIME_CFG) + _prefixed("curlft_", _LIFETIME_CUR)
              + _prefixed("stats_", _STATS)
              + (("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"), ("replay_window", "B"),
                 ("flags", "B"), ("__pad", "7x")))


@_zeroed
class xfrm_usersa_id(xfrm_msg):
    """XFRM_MSG_DELSA (and GETSA of one state)."""

    __slots__ = ()
    fields = (("daddr", ADDR), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "1x"))


@_zeroed
class xfrm_userpolicy_info(xfrm_msg):
    """XFRM_MSG_NEWPOLICY / UPDPOLICY, and each policy of a GETPOLICY dump."""

    __slots__ = ()
    fields = (_prefixed("sel_", _SELECTOR) + _prefixed("lft_", _LIFETIME_CFG)
              + _prefixed("curlft_", _LIFETIME_CUR)
              + (("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"), ("flags", "B"),
                 ("share", "B"), ("__pad", "4x")))


@_zeroed
class xfrm_userpolicy_id(xfrm_msg):
    """XFRM_MSG_DELPOLICY (and GETPOLICY of one policy)."""

    __slots__ = ()
    fields = _prefixed("sel_", _SELECTOR) + (("index", "I"), ("dir", "B"), ("__pad", "3x"))


class xfrm_usersa_flush(nlmsg):
    """XFRM_MSG_FLUSHSA: struct xfrm_usersa_flush is one byte, sent unpadded (17 bytes) as iproute2 does."""

    __slots__ = ()
    align = 0
    fields = (("proto", "B"),)


STRUCT_SIZES = {  # sizeof() on x86_64, checked by the unit tests
    xfrm_usersa_info: 224, xfrm_usersa_id: 24, xfrm_userpolicy_info: 168, xfrm_userpolicy_id: 64,
    xfrm_usersa_flush: 1,
}
USER_TMPL_SIZE = _size(_USER_TMPL)  # 64
SELECTOR_SIZE = _size(_SELECTOR)  # 56


# --- values --------------------------------------------------------------------------------------

def _ip(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IP address") from None


def _canon(obj, name: str, what: str) -> int:
    """Replace obj.<name> by its canonical text; return its address family."""
    addr = _ip(getattr(obj, name), what)
    object.__setattr__(obj, name, addr.compressed)
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def _u32(value: int, what: str, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 0xFFFFFFFF:
        raise ValueError(f"{what} must be an integer from {low} to {0xFFFFFFFF}, not {value!r}")


def _family_name(family: int) -> str:
    return "IPv4" if family == socket.AF_INET else "IPv6"


@dataclass(frozen=True)
class Selector:
    """Traffic a policy (or a state) applies to: src/src_len -> dst/dst_len, of protocol proto (0: any)."""

    src: str
    dst: str
    src_len: int
    dst_len: int
    proto: int = 0

    def __post_init__(self):
        fs = _canon(self, "src", "selector src")
        fd = _canon(self, "dst", "selector dst")
        if fs != fd:
            raise ValueError(f"selector {self.src} -> {self.dst} mixes IPv4 and IPv6")
        bits = 32 if fs == socket.AF_INET else 128
        for name in ("src_len", "dst_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= bits:
                raise ValueError(f"selector {name} must be 0..{bits} for {_family_name(fs)}, not {value!r}")
        if not isinstance(self.proto, int) or isinstance(self.proto, bool) or not 0 <= self.proto <= 255:
            raise ValueError(f"selector proto must be 0..255, not {self.proto!r}")

    @property
    def family(self) -> int:
        return socket.AF_INET if ipaddress.ip_address(self.src).version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        proto = f" proto {self.proto}" if self.proto else ""
        return f"{self.src}/{self.src_len} -> {self.dst}/{self.dst_len}{proto}"


@dataclass(frozen=True)
class Algorithm:
    """One transform: an AEAD (icv_bits), a cipher (neither), or an authenticator (trunc_bits)."""

    name: str
    key: bytes
    icv_bits: int | None = None
    trunc_bits: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or not self.name.isascii() \
                or len(self.name) > ALG_NAME_MAX or "\0" in self.name:
            raise ValueError(f"algorithm name must be 1..{ALG_NAME_MAX} ASCII characters, not {self.name!r}")
        if not isinstance(self.key, (bytes, bytearray)):
            raise ValueError(f"algorithm {self.name}: the key must be bytes")
        object.__setattr__(self, "key", bytes(self.key))
        if len(self.key) * 8 > 0xFFFFFFFF:
            raise ValueError(f"algorithm {self.name}: key too long")
        if self.icv_bits is not None and self.trunc_bits is not None:
            raise ValueError(f"algorithm {self.name}: icv_bits (AEAD) and trunc_bits (auth) exclude each other")
        for name in ("icv_bits", "trunc_bits"):
            value = getattr(self, name)
            if value is not None:
                _u32(value, f"algorithm {self.name}: {name}", low=1)

    def __repr__(self) -> str:  # never print keys
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("icv_bits", "trunc_bits") if getattr(self, n))
        return f"Algorithm({self.name!r}, <{len(self.key)} key bytes>{extra})"


def gcm_aes(key: bytes) -> Algorithm:
    """The default transform: rfc4106(gcm(aes)), AES-128 (20 key bytes with the salt), 128-bit ICV."""
    if len(key) != AEAD_GCM_KEY_LEN:
        raise ValueError(f"{AEAD_GCM_AES} with AES-128 needs {AEAD_GCM_KEY_LEN} key bytes (16 key + 4 salt),"
                         f" not {len(key)}")
    return Algorithm(AEAD_GCM_AES, key, icv_bits=AEAD_GCM_ICV_BITS)


@dataclass(frozen=True)
class Encap:
    """ESP-in-UDP (UDP_ENCAP_ESPINUDP): the UDP ports of the outer packets, from src (sport) to dst."""

    sport: int
    dport: int

    def __post_init__(self):
        for name in ("sport", "dport"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
                raise ValueError(f"encap {name} must be a port 1..65535, not {value!r}")


@dataclass(frozen=True)
class State:
    """An ESP tunnel-mode SA from src to dst (the outer addresses), found by (dst, spi).

    Either aead alone, or crypt with auth. sel None: the SA accepts any inner traffic (the
    policies choose), as `ip xfrm state add` without `sel`."""

    src: str
    dst: str
    spi: int
    reqid: int
    aead: Algorithm | None = None
    crypt: Algorithm | None = None
    auth: Algorithm | None = None
    encap: Encap | None = None
    mode: str = "tunnel"
    replay_window: int = REPLAY_WINDOW_MAX
    sel: Selector | None = None

    def __post_init__(self):
        fs = _canon(self, "src", "state src")
        fd = _canon(self, "dst", "state dst")
        if fs != fd:
            raise ValueError(f"state {self.src} -> {self.dst} mixes IPv4 and IPv6")
        _u32(self.spi, "state spi", low=1)
        _u32(self.reqid, "state reqid")
        where = f"state {self.src} -> {self.dst} spi {self.spi:#x}"
        if self.mode != "tunnel":
            raise ValueError(f"{where}: mode must be 'tunnel', not {self.mode!r}")
        if not isinstance(self.replay_window, int) or not 0 <= self.replay_window <= REPLAY_WINDOW_MAX:
            raise ValueError(f"{where}: replay_window must be 0..{REPLAY_WINDOW_MAX}, not {self.replay_window!r}")
        for name, cls in (("aead", Algorithm), ("crypt", Algorithm), ("auth", Algorithm), ("encap", Encap),
                          ("sel", Selector)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ValueError(f"{where}: {name} must be {'an' if cls is Encap else 'a'} {cls.__name__}")
        if self.aead is not None:
            if self.crypt is not None or self.auth is not None:
                raise ValueError(f"{where}: an AEAD excludes crypt and auth")
            if self.aead.icv_bits is None:
                raise ValueError(f"{where}: AEAD {self.aead.name} needs icv_bits")
        elif self.crypt is None:
            raise ValueError(f"{where}: ESP needs an AEAD or a cipher (crypt)")
        else:
            if self.crypt.icv_bits is not None or self.crypt.trunc_bits is not None:
                raise ValueError(f"{where}: cipher {self.crypt.name} takes neither icv_bits nor trunc_bits")
            if self.auth is None:
                raise ValueError(f"{where}: cipher {self.crypt.name} without auth (unauthenticated ESP) is refused")
            if self.auth.trunc_bits is None:
                raise ValueError(f"{where}: auth {self.auth.name} needs trunc_bits")

    @property
    def family(self) -> int:
        return socket.AF_INET if ipaddress.ip_address(self.src).version == 4 else socket.AF_INET6


@dataclass(frozen=True)
class StateStatus:
    """A state as the kernel dumps it, with its counters (curlft and stats)."""

    state: State
    bytes: int = 0
    packets: int = 0
    add_time: int = 0  # seconds since the epoch
    use_time: int = 0  # 0: never used
    replay: int = 0  # packets dropped as replayed
    integrity_failed: int = 0  # packets dropped on a bad ICV


@dataclass(frozen=True)
class Policy:
    """Traffic matching sel in direction dir goes through the ESP tunnel tmpl_src -> tmpl_dst (reqid).

    tmpl_src/tmpl_dst None (both): no template, the policy only allows (plain) or blocks."""

    sel: Selector
    dir: str
    tmpl_src: str | None
    tmpl_dst: str | None
    reqid: int = 0
    priority: int = 0  # lower wins; 0 as `ip xfrm policy add` without priority
    action: str = "allow"

    def __post_init__(self):
        if not isinstance(self.sel, Selector):
            raise ValueError("policy sel must be a Selector")
        if self.dir not in DIRS:
            raise ValueError(f"policy dir must be one of {', '.join(DIRS)}, not {self.dir!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"policy action must be allow or block, not {self.action!r}")
        _u32(self.reqid, "policy reqid")
        _u32(self.priority, "policy priority")
        if (self.tmpl_src is None) != (self.tmpl_dst is None):
            raise ValueError(f"policy {self.sel} {self.dir}: give both tmpl_src and tmpl_dst, or neither")
        if self.tmpl_src is not None:
            fs = _canon(self, "tmpl_src", "policy tmpl_src")
            fd = _canon(self, "tmpl_dst", "policy tmpl_dst")
            if fs != fd:
                raise ValueError(f"policy template {self.tmpl_src} -> {self.tmpl_dst} mixes IPv4 and IPv6")

    @property
    def tmpl_family(self) -> int | None:
        if self.tmpl_src is None:
            return None
        return socket.AF_INET if ipaddress.ip_address(self.tmpl_src).version == 4 else socket.AF_INET6


# --- encoding helpers ----------------------------------------------------------------------------

def _addr_bytes(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def _addr_text(raw: bytes, family: int) -> str:
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(bytes(raw[:16])))
    raise ValueError(f"unknown address family {family}")


def _family_of(text: str) -> int:
    return socket.AF_INET if _ip(text, "address").version == 4 else socket.AF_INET6


def _set_selector(msg: nlmsg, sel: Selector | None) -> None:
    if sel is None:
        return  # all zero, family AF_UNSPEC: the kernel takes the state's family
    msg["sel_daddr"] = _addr_bytes(sel.dst)
    msg["sel_saddr"] = _addr_bytes(sel.src)
    msg["sel_family"] = sel.family
    msg["sel_prefixlen_d"] = sel.dst_len
    msg["sel_prefixlen_s"] = sel.src_len
    msg["sel_proto"] = sel.proto


def _get_selector(msg: nlmsg) -> Selector:
    family = msg["sel_family"]
    for port in ("sel_dport", "sel_dport_mask", "sel_sport", "sel_sport_mask", "sel_ifindex"):
        if msg[port]:
            raise ValueError(f"selector with {port[4:]} {msg[port]} is not supported")
    return Selector(_addr_text(msg["sel_saddr"], family), _addr_text(msg["sel_daddr"], family),
                    msg["sel_prefixlen_s"], msg["sel_prefixlen_d"], msg["sel_proto"])


def _set_infinite_lifetime(msg: nlmsg) -> None:
    for limit in ("soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit"):
        msg["lft_" + limit] = XFRM_INF


def _header(msg: nlmsg, msg_type: int, flags: int = _REQUEST_ACK) -> nlmsg:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    return msg


def _alg_name(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")


def _alg_key(attr: dict) -> bytes:
    key = attr["alg_key"]
    nbytes = (attr["alg_key_len"] + 7) // 8
    if len(key) < nbytes:
        raise ValueError(f"algorithm {_alg_name(attr['alg_name'])}: key shorter than its length")
    return key[:nbytes]


# --- builders ------------------------------------------------------------------------------------

def new_sa(state: State, update: bool = False) -> xfrm_usersa_info:
    """XFRM_MSG_NEWSA (EEXIST if (dst, spi) is taken) or, update=True, XFRM_MSG_UPDSA (ESRCH if absent)."""
    msg = _header(xfrm_usersa_info(), XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA)
    _set_selector(msg, state.sel)
    msg["id_daddr"] = _addr_bytes(state.dst)
    msg["id_spi"] = state.spi
    msg["id_proto"] = IPPROTO_ESP
    msg["saddr"] = _addr_bytes(state.src)
    _set_infinite_lifetime(msg)
    msg["reqid"] = state.reqid
    msg["family"] = state.family
    msg["mode"] = XFRM_MODE_TUNNEL
    msg["replay_window"] = state.replay_window
    attrs = []
    if state.aead is not None:
        a = state.aead
        attrs.append(("XFRMA_ALG_AEAD", {"alg_name": a.name, "alg_key_len": len(a.key) * 8,
                                         "alg_icv_len": a.icv_bits, "alg_key": a.key}))
    else:
        a = state.auth
        attrs.append(("XFRMA_ALG_AUTH_TRUNC", {"alg_name": a.name, "alg_key_len": len(a.key) * 8,
                                               "alg_trunc_len": a.trunc_bits, "alg_key": a.key}))
        c = state.crypt
        attrs.append(("XFRMA_ALG_CRYPT", {"alg_name": c.name, "alg_key_len": len(c.key) * 8, "alg_key": c.key}))
    if state.encap is not None:
        attrs.append(("XFRMA_ENCAP", {"encap_type": UDP_ENCAP_ESPINUDP, "encap_sport": state.encap.sport,
                                      "encap_dport": state.encap.dport, "encap_oa": bytes(16)}))
    msg["attrs"] = attrs
    return msg


def del_sa(dst: str, spi: int, family: int | None = None, src: str | None = None) -> xfrm_usersa_id:
    """XFRM_MSG_DELSA of the ESP state (dst, spi). family defaults to dst's; src is only carried along
    (XFRMA_SRCADDR, zero without src, as iproute2 sends it): for ESP the kernel finds the state by
    (dst, spi) alone."""
    _u32(spi, "state spi", low=1)
    dfam = _family_of(dst)
    if family is not None and family != dfam:
        raise ValueError(f"state dst {dst} is not of family {family}")
    if src is not None and _family_of(src) != dfam:
        raise ValueError(f"state src {src} and dst {dst} mix IPv4 and IPv6")
    msg = _header(xfrm_usersa_id(), XFRM_MSG_DELSA)
    msg["daddr"] = _addr_bytes(dst)
    msg["spi"] = spi
    msg["family"] = dfam
    msg["proto"] = IPPROTO_ESP
    msg["attrs"] = [("XFRMA_SRCADDR", _addr_bytes(src) if src is not None else bytes(16))]
    return msg


def _user_tmpl(policy: Policy) -> dict:
    return {"id_daddr": _addr_bytes(policy.tmpl_dst), "id_spi": 0, "id_proto": IPPROTO_ESP,
            "family": policy.tmpl_family, "saddr": _addr_bytes(policy.tmpl_src), "reqid": policy.reqid,
            "mode": XFRM_MODE_TUNNEL, "share": XFRM_SHARE_ANY, "optional": 0,
            "aalgos": ALL_ALGOS, "ealgos": ALL_ALGOS, "calgos": ALL_ALGOS}


def new_policy(policy: Policy, update: bool = False) -> xfrm_userpolicy_info:
    """XFRM_MSG_NEWPOLICY (EEXIST if (sel, dir) has one) or, update=True, XFRM_MSG_UPDPOLICY (adds or replaces)."""
    msg = _header(xfrm_userpolicy_info(), XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY)
    _set_selector(msg, policy.sel)
    _set_infinite_lifetime(msg)
    msg["priority"] = policy.priority
    msg["dir"] = DIRS[policy.dir]
    msg["action"] = ACTIONS[policy.action]
    msg["share"] = XFRM_SHARE_ANY
    msg["attrs"] = [("XFRMA_TMPL", [_user_tmpl(policy)])] if policy.tmpl_src is not None else []
    return msg


def del_policy(sel: Selector, dir: str) -> xfrm_userpolicy_id:
    """XFRM_MSG_DELPOLICY of the (main type) policy of sel in direction dir."""
    if dir not in DIRS:
        raise ValueError(f"policy dir must be one of {', '.join(DIRS)}, not {dir!r}")
    msg = _header(xfrm_userpolicy_id(), XFRM_MSG_DELPOLICY)
    _set_selector(msg, sel)
    msg["dir"] = DIRS[dir]
    return msg


def flush_sa(proto: int = 0) -> xfrm_usersa_flush:
    """XFRM_MSG_FLUSHSA: every state of proto (0: of any protocol, as `ip xfrm state flush`) in the
    namespace, ours or not: for throwaway namespaces and tests, not for a shared host."""
    if not isinstance(proto, int) or not 0 <= proto <= 255:
        raise ValueError(f"flush proto must be 0..255, not {proto!r}")
    msg = _header(xfrm_usersa_flush(), XFRM_MSG_FLUSHSA)
    msg["proto"] = proto
    return msg


def dump_request(msg_type: int) -> nlmsg:
    """A GETSA or GETPOLICY dump request (no payload: no filter)."""
    if msg_type not in (XFRM_MSG_GETSA, XFRM_MSG_GETPOLICY):
        raise ValueError(f"not a dump: {msg_type:#x}")
    return _header(nlmsg(), msg_type, NLM_F_REQUEST | NLM_F_DUMP)


# --- parsers -------------------------------------------------------------------------------------

def _attr(msg: nlmsg, name: str):
    return msg.get_attr(name)


def _refuse_marks(msg: nlmsg, what: str) -> None:
    mark = _attr(msg, "XFRMA_MARK")
    if mark and (mark["v"] or mark["m"]):
        raise ValueError(f"{what} has a mark")
    if _attr(msg, "XFRMA_IF_ID"):
        raise ValueError(f"{what} has an interface id")


def parse_sa(msg: xfrm_usersa_info) -> StateStatus:
    """A decoded state message (a GETSA dump entry, or new_sa() encoded and decoded) as a StateStatus.

    ValueError for a state that State cannot express (not ESP, not tunnel mode, a mark, ...)."""
    family = msg["family"]
    src, dst = _addr_text(msg["saddr"], family), _addr_text(msg["id_daddr"], family)
    what = f"state {src} -> {dst} spi {msg['id_spi']:#x}"
    if msg["id_proto"] != IPPROTO_ESP:
        raise ValueError(f"{what}: protocol {msg['id_proto']} is not ESP")
    if msg["mode"] != XFRM_MODE_TUNNEL:
        raise ValueError(f"{what}: mode {msg['mode']} is not tunnel")
    _refuse_marks(msg, what)
    aead = crypt = auth = encap = None
    a = _attr(msg, "XFRMA_ALG_AEAD")
    if a:
        aead = Algorithm(_alg_name(a["alg_name"]), _alg_key(a), icv_bits=a["alg_icv_len"])
    a = _attr(msg, "XFRMA_ALG_CRYPT")
    if a:
        crypt = Algorithm(_alg_name(a["alg_name"]), _alg_key(a))
    a = _attr(msg, "XFRMA_ALG_AUTH_TRUNC")  # the kernel dumps it beside XFRMA_ALG_AUTH
    if a:
        auth = Algorithm(_alg_name(a["alg_name"]), _alg_key(a), trunc_bits=a["alg_trunc_len"])
    elif _attr(msg, "XFRMA_ALG_AUTH"):
        raise ValueError(f"{what}: authentication without its truncation length")
    if _attr(msg, "XFRMA_ALG_COMP"):
        raise ValueError(f"{what}: compression is not supported")
    e = _attr(msg, "XFRMA_ENCAP")
    if e:
        if e["encap_type"] != UDP_ENCAP_ESPINUDP:
            raise ValueError(f"{what}: encapsulation type {e['encap_type']} is not ESP-in-UDP")
        encap = Encap(e["encap_sport"], e["encap_dport"])
    sel = None
    if msg["sel_family"] and (any(msg["sel_daddr"]) or any(msg["sel_saddr"]) or msg["sel_prefixlen_d"]
                              or msg["sel_prefixlen_s"] or msg["sel_proto"] or msg["sel_family"] != family):
        sel = _get_selector(msg)
    try:
        state = State(src, dst, msg["id_spi"], msg["reqid"], aead=aead, crypt=crypt, auth=auth, encap=encap,
                      replay_window=msg["replay_window"], sel=sel)
    except ValueError as e:
        raise ValueError(f"{what}: not supported: {e}") from None
    return StateStatus(state, bytes=msg["curlft_bytes"], packets=msg["curlft_packets"],
                       add_time=msg["curlft_add_time"], use_time=msg["curlft_use_time"],
                       replay=msg["stats_replay"], integrity_failed=msg["stats_integrity_failed"])


def parse_policy(msg: xfrm_userpolicy_info) -> Policy:
    """A decoded policy message (a GETPOLICY dump entry, or new_policy() encoded and decoded) as a Policy.

    ValueError for a policy that Policy cannot express (several templates, transport mode, a mark, ...)."""
    sel = _get_selector(msg)
    dirs = {v: k for k, v in DIRS.items()}
    actions = {v: k for k, v in ACTIONS.items()}
    if msg["dir"] not in dirs or msg["action"] not in actions:
        raise ValueError(f"policy {sel}: direction {msg['dir']} or action {msg['action']} unknown")
    what = f"policy {sel} {dirs[msg['dir']]}"
    _refuse_marks(msg, what)
    ptype = _attr(msg, "XFRMA_POLICY_TYPE")
    if ptype and ptype["type"] != 0:
        raise ValueError(f"{what}: sub policies are not supported")
    tmpls = [t for attr in msg.get_attrs("XFRMA_TMPL") for t in attr]
    tmpl_src = tmpl_dst = None
    reqid = 0
    if len(tmpls) > 1:
        raise ValueError(f"{what}: {len(tmpls)} templates, only one is supported")
    if tmpls:
        t = tmpls[0]
        if t["id_proto"] != IPPROTO_ESP or t["mode"] != XFRM_MODE_TUNNEL or t["optional"] or t["id_spi"]:
            raise ValueError(f"{what}: the template is not a plain ESP tunnel")
        family = t["family"] or msg["sel_family"]
        tmpl_src, tmpl_dst = _addr_text(t["saddr"], family), _addr_text(t["id_daddr"], family)
        reqid = t["reqid"]
    return Policy(sel, dirs[msg["dir"]], tmpl_src, tmpl_dst, reqid=reqid, priority=msg["priority"],
                  action=actions[msg["action"]])


# --- errors --------------------------------------------------------------------------------------

def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return exc.code
    if isinstance(exc, OSError):
        return exc.errno
    return None


def esp_missing(exc: BaseException) -> bool:
    """The kernel has no ESP transform (no esp4/esp6 module): its answer to a new state."""
    return _errno(exc) == errno.EPROTONOSUPPORT


def algorithm_missing(exc: BaseException) -> bool:
    """The kernel's crypto API lacks an algorithm a new state names (e.g. gcm not built)."""
    return _errno(exc) == errno.ENOSYS


# --- the shell -----------------------------------------------------------------------------------

class XfrmMarshal(Marshal):
    msg_map = {
        XFRM_MSG_NEWSA: xfrm_usersa_info,
        XFRM_MSG_UPDSA: xfrm_usersa_info,
        XFRM_MSG_DELSA: xfrm_usersa_id,
        XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
        XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
        XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    }


class _AsyncXfrmSocket(AsyncNetlinkSocket):
    marshal_class = XfrmMarshal


class _XfrmSocket(NetlinkSocket):
    async_class = _AsyncXfrmSocket


class Xfrm:
    """A NETLINK_XFRM socket (in netns, a named network namespace, if given). Synchronous: use it
    from a worker thread. Kernel refusals raise OSError(errno, one line naming the request)."""

    def __init__(self, netns: str | None = None):
        # flags=0: a netns that does not exist is an error, not created
        try:
            self._sock = _XfrmSocket(family=NETLINK_XFRM, ext_ack=True, netns=netns, flags=0)
        except OSError as e:
            where = f"network namespace {netns}" if netns else "this network namespace"
            raise OSError(e.errno, f"cannot open an xfrm socket in {where}: {e.strerror or e}") from None
        try:
            self._sock.bind()
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Xfrm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, msg: nlmsg, what: str) -> list:
        try:
            return list(self._sock.nlm_request(msg, msg["header"]["type"], msg["header"]["flags"]))
        except NetlinkError as e:
            text = e.args[1] if len(e.args) > 1 and e.args[1] else os.strerror(e.code)
            raise OSError(e.code, f"{what}: {text} ({errno.errorcode.get(e.code, e.code)})") from None

    def add_state(self, state: State, update: bool = False) -> None:
        verb = "update" if update else "add"
        self._request(new_sa(state, update),
                      f"xfrm state {verb} {state.src} -> {state.dst} spi {state.spi:#x}")

    def delete_state(self, dst: str, spi: int) -> None:
        self._request(del_sa(dst, spi), f"xfrm state delete dst {dst} spi {spi:#x}")

    def _dump(self, request: int, reply: int, parse, what: str) -> list:
        """What the kernel dumps, parsed; entries the values cannot express are left out."""
        out = []
        for msg in self._request(dump_request(request), what):
            if msg["header"]["type"] != reply:
                continue
            try:
                out.append(parse(msg))
            except ValueError:
                continue
        return out

    def states(self) -> list[StateStatus]:
        """The ESP tunnel states of the namespace that State can express (others are left out)."""
        return self._dump(XFRM_MSG_GETSA, XFRM_MSG_NEWSA, parse_sa, "xfrm state list")

    def add_policy(self, policy: Policy, update: bool = False) -> None:
        verb = "update" if update else "add"
        self._request(new_policy(policy, update), f"xfrm policy {verb} {policy.sel} dir {policy.dir}")

    def delete_policy(self, sel: Selector, dir: str) -> None:
        self._request(del_policy(sel, dir), f"xfrm policy delete {sel} dir {dir}")

    def policies(self) -> list[Policy]:
        """The policies of the namespace that Policy can express (others are left out)."""
        return self._dump(XFRM_MSG_GETPOLICY, XFRM_MSG_NEWPOLICY, parse_policy, "xfrm policy list")

    def flush_states(self, proto: int = IPPROTO_ESP) -> None:
        """Every state of proto in the namespace, ours or not: for throwaway namespaces and tests."""
        self._request(flush_sa(proto), "xfrm state flush")
