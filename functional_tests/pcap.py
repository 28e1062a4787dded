"""A minimal reader for classic pcap files (what `tcpdump -w` writes), enough for tests to
assert properties of every packet on a link.

    for p in read("x.pcap"):
        p.proto, p.src, p.sport, p.dst, p.dport, p.payload, p.raw

Link types: Ethernet (1), raw IP (101, 228, 229) and Linux cooked capture (113, 276).
IPv4 and IPv6 (extension headers skipped). `proto` is "tcp", "udp", "icmp", "icmp6" or
"ip:N" for other IP protocols; for frames that are not IP it is "arp" or "eth:0xXXXX" and
src/dst are None. sport/dport are None without ports (ICMP, non-first fragments).
`payload` is what follows the transport header (TCP data, UDP data, the ICMP body);
`raw` is the whole captured frame."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import NamedTuple


class Packet(NamedTuple):
    proto: str
    src: str | None
    sport: int | None
    dst: str | None
    dport: int | None
    payload: bytes
    raw: bytes

    @property
    def is_ip(self) -> bool:
        return self.src is not None


ETHERNET, RAW, IPV4, IPV6, SLL, SLL2 = 1, 101, 228, 229, 113, 276
NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}
IPV6_EXTENSIONS = {0, 43, 60, 51}  # hop-by-hop, routing, destination options, AH; 44 = fragment


def read(path: str | Path) -> list[Packet]:
    return parse(Path(path).read_bytes())


def parse(data: bytes) -> list[Packet]:
    if len(data) < 24:
        raise ValueError(f"not a pcap file ({len(data)} bytes)")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"not a classic pcap file (magic {magic.hex()}; pcapng is not supported)")
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0x0FFFFFFF
    packets, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(frame) < incl:
            break  # a record cut short at the end of the file
        packets.append(decode(frame, linktype))
    return packets


def decode(frame: bytes, linktype: int) -> Packet:
    if linktype == ETHERNET:
        if len(frame) < 14:
            return Packet("eth:short", None, None, None, None, b"", frame)
        ethertype, off = struct.unpack("!H", frame[12:14])[0], 14
        while ethertype in (0x8100, 0x88A8) and len(frame) >= off + 4:  # VLAN tags
            ethertype, off = struct.unpack("!H", frame[off + 2:off + 4])[0], off + 4
    elif linktype == SLL:
        ethertype, off = struct.unpack("!H", frame[14:16])[0], 16
    elif linktype == SLL2:
        ethertype, off = struct.unpack("!H", frame[0:2])[0], 20
    elif linktype in (RAW, IPV4, IPV6):
        version = frame[0] >> 4 if frame else 0
        ethertype, off = {4: 0x0800, 6: 0x86DD}.get(version, 0), 0
    else:
        raise ValueError(f"link type {linktype} not supported")
    if ethertype == 0x0800:
        return ipv4(frame, off)
    if ethertype == 0x86DD:
        return ipv6(frame, off)
    name = "arp" if ethertype == 0x0806 else f"eth:{ethertype:#06x}"
    return Packet(name, None, None, None, None, frame[off:], frame)


def ipv4(frame: bytes, off: int) -> Packet:
    ihl = (frame[off] & 0x0F) * 4
    total = struct.unpack("!H", frame[off + 2:off + 4])[0]
    fragment_offset = struct.unpack("!H", frame[off + 6:off + 8])[0] & 0x1FFF
    proto = frame[off + 9]
    src = str(ipaddress.IPv4Address(frame[off + 12:off + 16]))
    dst = str(ipaddress.IPv4Address(frame[off + 16:off + 20]))
    body = frame[off + ihl:off + max(total, ihl)]
    return transport(proto, src, dst, body, frame, first_fragment=fragment_offset == 0)


def ipv6(frame: bytes, off: int) -> Packet:
    length = struct.unpack("!H", frame[off + 4:off + 6])[0]
    proto = frame[off + 6]
    src = str(ipaddress.IPv6Address(frame[off + 8:off + 24]))
    dst = str(ipaddress.IPv6Address(frame[off + 24:off + 40]))
    body = frame[off + 40:off + 40 + length]
    first = True
    while body and (proto in IPV6_EXTENSIONS or proto == 44):
        if proto == 44:
            first = first and (struct.unpack("!H", body[2:4])[0] >> 3) == 0
            proto, body = body[0], body[8:]
        elif proto == 51:  # AH: length in 4-octet units, minus 2
            proto, body = body[0], body[(body[1] + 2) * 4:]
        else:
            proto, body = body[0], body[(body[1] + 1) * 8:]
    return transport(proto, src, dst, body, frame, first_fragment=first)


def transport(proto: int, src: str, dst: str, body: bytes, frame: bytes, first_fragment: bool) -> Packet:
    name = NAMES.get(proto, f"ip:{proto}")
    if not first_fragment:
        return Packet(name, src, None, dst, None, body, frame)
    if proto == 6 and len(body) >= 20:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(name, src, sport, dst, dport, body[(body[12] >> 4) * 4:], frame)
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return Packet(name, src, sport, dst, dport, body[8:], frame)
    if proto in (1, 58):
        return Packet(name, src, None, dst, None, body[8:], frame)
    return Packet(name, src, None, dst, None, body, frame)
