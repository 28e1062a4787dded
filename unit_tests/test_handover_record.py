"""The handover record (its encoding, versions, checks) and the fd transfer over a socketpair."""

import json
import os
import socket

import pytest

from wormholed.handover import transfer
from wormholed.handover.record import (MAGIC, STATE_NAME, VERSION, FdTable, HandoverError, decode, encode,
                                       fd_index, fd_name, half, half_buffered, peek_version)


def sample(fds=6):
    return {"from": {"pid": 1}, "fds": fds, "control": [0],
            "wormholes": [{"id": "w", "words": ["url", ":80", "tail", "url", ":81"], "saved": True, "owner": None,
                           "owner_label": None, "tunnel": False, "ctx": None,
                           "segments": {"w": {"head": 1, "active": True, "containers": {}, "stats": [3, 10, 20, 0],
                                              "relays": [{"client": 2, "tail": 3, "tail_index": 0,
                                                          "up": half((4, 5), 7, b"\x00abc", False),
                                                          "down": half(None, 0, b"", True)}],
                                              "clients": [], "flows": []}}}]}


def test_round_trip_with_buffered_bytes():
    state = decode(encode(sample()), 6)
    assert state["version"] == VERSION and state["magic"] == MAGIC
    relay = state["wormholes"][0]["segments"]["w"]["relays"][0]
    assert half_buffered(relay["up"]) == b"\x00abc" and relay["up"]["pipe"] == [4, 5]
    assert relay["down"] == {"pipe": None, "pending": 0, "buffered": "", "done": True}


def test_unknown_versions_and_foreign_data_are_refused():
    newer = json.loads(encode(sample()))
    newer["version"] = VERSION + 1
    with pytest.raises(HandoverError, match=f"version {VERSION + 1}; this wormholed reads {VERSION}"):
        decode(json.dumps(newer).encode(), 6)
    assert peek_version(json.dumps(newer).encode()) == VERSION + 1
    for junk in (b"", b"[]", b"{}", b"\xff", json.dumps({"magic": "other", "version": 1}).encode()):
        assert peek_version(junk) is None
        with pytest.raises(HandoverError, match="not a wormhole handover record"):
            decode(junk, 0)


@pytest.mark.parametrize("breakage", [
    lambda s: s.update(fds=5),  # fewer fds came than it names
    lambda s: s["control"].append(6),
    lambda s: s["wormholes"][0]["segments"]["w"]["relays"][0].update(tail=-1),
    lambda s: s["wormholes"][0]["segments"]["w"]["relays"][0]["up"].update(buffered="not base64!"),
    lambda s: s["wormholes"][0]["segments"]["w"]["relays"][0]["up"].update(pending=-1),
    lambda s: s["wormholes"][0]["segments"]["w"]["relays"][0]["up"].update(done="yes"),
    lambda s: s["wormholes"][0].update(words=["url", 80]),
    lambda s: s["wormholes"][0]["segments"]["w"].pop("flows"),
])
def test_malformed_records_are_refused_not_half_read(breakage):
    state = sample()
    breakage(state)
    with pytest.raises(HandoverError, match="malformed handover record|names 5 fds"):
        decode(encode(state), 6)


def test_fd_names_follow_systemds_rules():
    table = FdTable()
    assert [table.add(fd) for fd in (10, 11, 12)] == [0, 1, 2]
    for name in table.names() + [STATE_NAME]:
        assert name.isascii() and ":" not in name and len(name) <= 255
    assert [fd_index(n) for n in (fd_name(7), STATE_NAME, "wormholed.socket", "wh", "whx")] == [7, None, None, None, None]


def test_transfer_over_a_seqpacket_pair_keeps_order_and_pipe_contents():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(300)]  # 600 fds: three messages of at most 253
    for i, (r, w) in enumerate(pipes):
        os.write(w, b"%d" % i)
    with a, b:
        transfer.send(a, b"the record", [fd for pair in pipes for fd in pair])
        record, fds = transfer.receive(b)
    assert record == b"the record" and len(fds) == 600
    for i in range(300):
        assert os.read(fds[2 * i], 10) == b"%d" % i  # the pipe's bytes came with it
    for fd in fds + [fd for pair in pipes for fd in pair]:
        os.close(fd)


def test_a_refusal_comes_back_as_a_handover_error():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(json.dumps({"refused": "this wormholed hands over version 9"}).encode())
        with pytest.raises(HandoverError, match="version 9"):
            transfer.receive(b)


def test_from_store_sorts_by_name_and_refuses_an_incomplete_store():
    state = transfer.memfd_with(b"rec")
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    record, fds, others = transfer.from_store([(w1, fd_name(1)), (99, "wormholed.socket"), (state, STATE_NAME),
                                               (r1, fd_name(0))])
    assert (record, fds, others) == (b"rec", [r1, w1], [99])
    state = transfer.memfd_with(b"rec")
    record, fds, others = transfer.from_store([(r2, fd_name(0)), (w2, fd_name(2)), (state, STATE_NAME)])
    assert (record, fds, others) == (b"rec", None, [])  # wh1 missing: not taken, ours closed
    with pytest.raises(OSError):
        os.fstat(r2)
    assert transfer.from_store([(5, "wormholed.socket")]) == (None, None, [5])
    for fd in (r1, w1):
        os.close(fd)
