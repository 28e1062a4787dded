"""WireGuard configuration as values: keys, the per-tunnel preshared key, and the two wire dialects.

A device has one private key, one listen port and one peer (a tunnel per peer
daemon). Userspace wireguard-go is configured through its UAPI text protocol,
the kernel module through generic netlink (pyroute2); both are written from the
same WgConfig and both read back into the same DeviceStatus, so the rest of the
daemon does not care which backend runs. Nothing here does I/O: the caller
moves the bytes, which keeps every parser testable on captured replies.

The preshared key is derived from the daemons' shared key.secret (HKDF-SHA256,
one per tunnel id), so a host without key.secret cannot complete a handshake
even if it learns the public keys, and no two tunnels share a preshared key."""

from __future__ import annotations

import base64
import binascii
import errno as errnos
import ipaddress
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wormhole.spec import hostport

KEY_LEN = 32
PSK_SALT = b"wormhole wireguard psk v1"
_ZERO_KEY = bytes(KEY_LEN)


class UapiError(Exception):
    """wireguard-go refused a request or sent a reply we cannot read; the message is fit for the user."""

    def __init__(self, errno: int, message: str):
        super().__init__(message)
        self.errno = errno


def _errno_name(code: int) -> str:
    return errnos.errorcode.get(abs(code), "unknown")


# --- keys ---------------------------------------------------------------------------------------

def new_private_key() -> bytes:
    """A fresh X25519 private key, 32 raw bytes."""
    key = X25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of private_key (32 raw bytes), as `wg pubkey` computes it."""
    key = X25519PrivateKey.from_private_bytes(private_key)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def from_b64(text: str) -> bytes:
    """A key from its base64 form (as `wg` prints it); anything but 32 bytes is refused."""
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid WireGuard key: not base64") from None
    if len(key) != KEY_LEN:
        raise ValueError(f"invalid WireGuard key: {len(key)} bytes instead of {KEY_LEN}")
    return key


def derive_psk(secret: bytes, tunnel_id: str) -> bytes:
    """The preshared key of tunnel tunnel_id: HKDF-SHA256 of the daemons' shared secret."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=PSK_SALT, info=tunnel_id.encode())
    return hkdf.derive(secret)


# --- configuration ------------------------------------------------------------------------------

def _check_key(name: str, key: bytes) -> None:
    if len(key) != KEY_LEN:
        raise ValueError(f"{name} must be {KEY_LEN} bytes, not {len(key)}")


def _prefixes(allowed_ips) -> tuple[str, ...]:
    """Each entry as a prefix, host bits cleared as WireGuard does ("fd00::7/64" -> "fd00::/64")."""
    return tuple(str(ipaddress.ip_network(ip, strict=False)) for ip in allowed_ips)


def _check_port(name: str, port: int, low: int) -> None:
    if not low <= port <= 65535:
        raise ValueError(f"{name} {port} is not in {low}-65535")


@dataclass(frozen=True)
class WgPeer:
    public_key: bytes
    preshared_key: bytes
    endpoint: tuple[str, int] | None  # an IP literal (no brackets) and a port
    allowed_ips: tuple[str, ...]  # kept as prefixes: "100.64.0.2" becomes "100.64.0.2/32", as status shows it
    keepalive: int = 25

    def __post_init__(self):
        object.__setattr__(self, "allowed_ips", _prefixes(self.allowed_ips))
        _check_key("peer public key", self.public_key)
        _check_key("preshared key", self.preshared_key)
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", tuple(self.endpoint))
            ipaddress.ip_address(self.endpoint[0])
            _check_port("endpoint port", self.endpoint[1], low=1)
        if not 0 <= self.keepalive <= 65535:
            raise ValueError(f"keepalive {self.keepalive} is not in 0-65535")


@dataclass(frozen=True)
class WgConfig:
    private_key: bytes
    listen_port: int
    peer: WgPeer

    def __post_init__(self):
        _check_key("private key", self.private_key)
        _check_port("listen port", self.listen_port, low=0)


def uapi_set(cfg: WgConfig) -> bytes:
    """The wireguard-go "set=1" request making the device exactly cfg (the one peer replaces any other)."""
    peer = cfg.peer
    lines = ["set=1", f"private_key={cfg.private_key.hex()}", f"listen_port={cfg.listen_port}",
             "replace_peers=true", f"public_key={peer.public_key.hex()}",
             f"preshared_key={peer.preshared_key.hex()}"]
    if peer.endpoint is not None:
        lines.append(f"endpoint={hostport(*peer.endpoint)}")
    lines += [f"persistent_keepalive_interval={peer.keepalive}", "replace_allowed_ips=true"]
    lines += [f"allowed_ip={ip}" for ip in peer.allowed_ips]
    return ("\n".join(lines) + "\n\n").encode()


# --- status -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerStatus:
    public_key: bytes
    preshared_key: bytes | None  # None: the peer has no preshared key (all zeros on the wire)
    endpoint: str | None  # "192.0.2.2:4501", "[2001:db8::2]:4501"
    last_handshake: float | None  # unix time; None: no handshake yet
    rx_bytes: int
    tx_bytes: int
    keepalive: int
    allowed_ips: tuple[str, ...]


@dataclass(frozen=True)
class DeviceStatus:
    private_key: bytes | None
    listen_port: int
    fwmark: int
    peers: tuple[PeerStatus, ...]


def _handshake(sec: int, nsec: int) -> float | None:
    return None if sec == 0 and nsec == 0 else sec + nsec / 1e9


def _nonzero(key: bytes) -> bytes | None:
    """None for the all-zero key, which both backends report for "no key set"."""
    return None if key == _ZERO_KEY else key


def _protocol_error(what: str) -> UapiError:
    return UapiError(-errnos.EPROTO, f"unreadable reply from wireguard-go: {what}")


def _uapi_errno(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _protocol_error(f"errno={text!r}") from None


def _uapi_key(key: str, value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != KEY_LEN:
        raise _protocol_error(f"{key} is not a 64-digit hex key")
    return raw


def _uapi_int(key: str, value: str) -> int:
    if not value.isdigit():
        raise _protocol_error(f"{key}={value!r} is not a number")
    return int(value)


_DEVICE_INTS = {"listen_port", "fwmark"}
_PEER_INTS = {"last_handshake_time_sec", "last_handshake_time_nsec", "rx_bytes", "tx_bytes",
              "persistent_keepalive_interval", "protocol_version"}


def _uapi_lines(text: str):
    """(key, value) pairs up to errno=N; a nonzero errno raises, a missing one too."""
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise _protocol_error(f"line {line[:40]!r} has no '='")
        if key == "errno":
            code = _uapi_errno(value)
            if code != 0:
                raise UapiError(code, f"wireguard-go could not report the device "
                                      f"(errno {code}: {_errno_name(code)})")
            return
        yield key, value
    raise _protocol_error("it ended before errno=")


def _new_peer(public: bytes) -> dict:
    return {"public_key": public, "preshared_key": _ZERO_KEY, "endpoint": None, "allowed_ips": [],
            "last_handshake_time_sec": 0, "last_handshake_time_nsec": 0, "rx_bytes": 0, "tx_bytes": 0,
            "persistent_keepalive_interval": 0}


def _peer_status(p: dict) -> PeerStatus:
    return PeerStatus(public_key=p["public_key"], preshared_key=_nonzero(p["preshared_key"]),
                      endpoint=p["endpoint"],
                      last_handshake=_handshake(p["last_handshake_time_sec"], p["last_handshake_time_nsec"]),
                      rx_bytes=p["rx_bytes"], tx_bytes=p["tx_bytes"],
                      keepalive=p["persistent_keepalive_interval"], allowed_ips=tuple(p["allowed_ips"]))


def _apply_uapi(device: dict, peers: list[dict], key: str, value: str) -> None:
    """One key of a get=1 reply into device or the current (last) peer; unknown or misplaced: error."""
    if key == "public_key":
        peers.append(_new_peer(_uapi_key(key, value)))
    elif not peers and key == "private_key":
        device[key] = _uapi_key(key, value)
    elif not peers and key in _DEVICE_INTS:
        device[key] = _uapi_int(key, value)
    elif peers and key == "preshared_key":
        peers[-1][key] = _uapi_key(key, value)
    elif peers and key in _PEER_INTS:
        peers[-1][key] = _uapi_int(key, value)
    elif peers and key == "endpoint":
        peers[-1][key] = value
    elif peers and key == "allowed_ip":
        peers[-1]["allowed_ips"].append(value)
    else:
        raise _protocol_error(f"unexpected key {key!r}")


def parse_uapi_get(text: str) -> DeviceStatus:
    """The device described by a wireguard-go "get=1" reply (its lines through errno=0)."""
    device, peers = {"private_key": None, "listen_port": 0, "fwmark": 0}, []
    for key, value in _uapi_lines(text):
        _apply_uapi(device, peers, key, value)
    return DeviceStatus(peers=tuple(_peer_status(p) for p in peers), **device)


def parse_uapi_reply(text: str) -> None:
    """Checks a "set=1" reply: errno=0 passes, anything else raises UapiError."""
    lines = [line for line in text.split("\n") if line]
    if len(lines) != 1 or not lines[0].startswith("errno="):
        raise _protocol_error(f"expected errno=N, got {text[:60]!r}")
    code = _uapi_errno(lines[0].removeprefix("errno="))
    if code != 0:
        raise UapiError(code, f"wireguard-go refused the configuration (errno {code}: {_errno_name(code)})")


# --- kernel (pyroute2) ----------------------------------------------------------------------------

def kernel_set_args(cfg: WgConfig) -> dict:
    """Keyword arguments for pyroute2's WireGuard().set(ifname, **kwargs) configuring cfg.

    pyroute2 cannot send WGDEVICE_F_REPLACE_PEERS: peers other than cfg.peer stay
    until removed (kernel_remove_args), unlike uapi_set which replaces them."""
    peer = cfg.peer
    args = {"public_key": b64(peer.public_key), "preshared_key": b64(peer.preshared_key),
            "persistent_keepalive": peer.keepalive, "replace_allowed_ips": True,
            "allowed_ips": list(peer.allowed_ips)}
    if peer.endpoint is not None:
        args["endpoint_addr"], args["endpoint_port"] = peer.endpoint
    return {"private_key": b64(cfg.private_key), "listen_port": cfg.listen_port, "peer": args}


def kernel_remove_args(status: DeviceStatus, cfg: WgConfig) -> list[dict]:
    """set() keyword arguments removing each peer of status that cfg does not name."""
    return [{"peer": {"public_key": b64(p.public_key), "remove": True}}
            for p in status.peers if p.public_key != cfg.peer.public_key]


def _nl_key(value) -> bytes:
    """pyroute2 decodes keys to base64 bytes."""
    return from_b64(value.decode() if isinstance(value, bytes) else value)


def _nl_endpoint(ep) -> str | None:
    if ep is None:
        return None
    host = ep["addr"]
    if ep.get("scope_id"):
        host = f"{host}%{ep['scope_id']}"
    return hostport(host, ep["port"])


def _nl_peer(peer) -> dict:
    hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
    psk = peer.get_attr("WGPEER_A_PRESHARED_KEY")
    return {"public_key": _nl_key(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
            "preshared_key": _ZERO_KEY if psk is None else _nl_key(psk),
            "endpoint": _nl_endpoint(peer.get_attr("WGPEER_A_ENDPOINT")),
            "allowed_ips": [ip["addr"] for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()],
            "last_handshake_time_sec": hs.get("tv_sec", 0), "last_handshake_time_nsec": hs.get("tv_nsec", 0),
            "rx_bytes": peer.get_attr("WGPEER_A_RX_BYTES") or 0,
            "tx_bytes": peer.get_attr("WGPEER_A_TX_BYTES") or 0,
            "persistent_keepalive_interval": peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0}


def _merge_peers(msgs) -> list[dict]:
    """Peers of a dump; one the kernel split over two messages (many allowed IPs) comes back whole."""
    peers: list[dict] = []
    for msg in msgs:
        for raw in msg.get_attr("WGDEVICE_A_PEERS") or ():
            p = _nl_peer(raw)
            if peers and peers[-1]["public_key"] == p["public_key"]:
                peers[-1]["allowed_ips"] += p["allowed_ips"]
            else:
                peers.append(p)
    return peers


def parse_kernel_info(msgs) -> DeviceStatus:
    """The DeviceStatus in pyroute2's WireGuard().info(ifname) messages (device attributes in the first)."""
    msgs = list(msgs)
    if not msgs:
        raise ValueError("no WireGuard device in the kernel's reply")
    first = msgs[0]
    private = first.get_attr("WGDEVICE_A_PRIVATE_KEY")
    return DeviceStatus(private_key=None if private is None else _nonzero(_nl_key(private)),
                        listen_port=first.get_attr("WGDEVICE_A_LISTEN_PORT") or 0,
                        fwmark=first.get_attr("WGDEVICE_A_FWMARK") or 0,
                        peers=tuple(_peer_status(p) for p in _merge_peers(msgs)))
