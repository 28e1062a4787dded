"""ipsec tunnels (xfrm, ESP in tunnel mode; ESP-in-UDP). They need a kernel with ESP, which
this project's test machines lack: these tests carry the `kernel` mark and run in the kernel
lab (`make test-kernel`), on a Debian kernel booted with virtme-ng. On a kernel without ESP,
test_tunnels.py::test_ipsec_on_a_kernel_without_esp_says_so checks the refusal instead."""

import os
import re
import secrets
import socket
import threading

import pytest

from harness import capture, recv_all
from test_tunnels import (MiB, assert_mebibyte_both_ways, assert_nothing_left, assert_ping, linked, one_tunnel,
                          port, tunnel_create, veth_name)
from test_tunnels import pair  # noqa: F401  (a fixture)
from test_wormholes import roundtrip

pytestmark = pytest.mark.kernel


def xfrm_counts(h) -> tuple[int, int]:
    """(states, policies) in the host's namespace, as `ip xfrm` lists them."""
    return tuple(len(re.findall(r"^src ", h.exec("ip", "xfrm", what).stdout, re.M)) for what in ("state", "policy"))


def assert_only_esp_leaves(cap, me: str, udp_ports: set[int] | None = None) -> None:
    """Every IP packet this host sent on the underlay is ESP (or ESP in UDP between the ports).
    Only outbound packets count: tcpdump also shows the receiving end's decrypted packet."""
    sent = [p for p in cap.ip() if p.src == me]
    assert sent, "the capture saw this host send"
    for p in sent:
        if udp_ports:
            assert p.proto == "udp" and {p.sport, p.dport} <= udp_ports, p[:5]
        else:
            assert p.proto == "ip:50", p[:5]


@pytest.mark.parametrize("udp", [False, True], ids=["esp", "esp-in-udp"])
def test_ipsec_tunnel_create_traffic_idempotent_delete(pair, udp):
    h1, h2 = pair
    opts = ("--type", "ipsec") + (("--udp",) if udp else ())
    src, dst = tunnel_create(h1, "192.0.2.2", *opts)
    near, far = one_tunnel(h1), one_tunnel(h2)
    assert near["type"] == far["type"] == "ipsec" and (far["local_ip"], far["remote_ip"]) == (src, dst)[::-1]
    assert near["spi_out"] == far["spi_in"] and near["spi_in"] == far["spi_out"], (near, far)
    assert xfrm_counts(h1) == xfrm_counts(h2) == (2, 3)
    assert_ping(h1, dst)
    assert_mebibyte_both_ways(h1, src, h2, dst)
    again = tunnel_create(h1, "192.0.2.2", *opts)
    assert again == (src, dst) and one_tunnel(h1)["spi_in"] == near["spi_in"], "asking again changes nothing"
    marker = b"WORMHOLE-MARKER-" + secrets.token_hex(16).encode()
    h2.echo_server(7300, host=dst)
    with capture(h1, veth_name(h1, h2)) as cap:
        with h1.connect(7300, dst) as s:
            s.sendall(marker * 8)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == marker * 8
    assert not [p for p in cap.packets if p.src == "192.0.2.1" and marker in p.raw]
    ports = {port(near["local_endpoint"]), port(near["remote_endpoint"])} if udp else None
    assert_only_esp_leaves(cap, "192.0.2.1", ports)
    h1.ok("tunnel-delete", "192.0.2.2")
    assert xfrm_counts(h1) == xfrm_counts(h2) == (0, 0)
    assert_nothing_left(h1, h2)


def test_ipsec_tunnel_wormhole_and_no_plaintext(make_host):
    h1, h2 = linked(make_host, ("--tunnel-type", "ipsec"), ("--tunnel-type", "ipsec"))
    h2.echo_server(3306)
    h1.create("id", "db", "url", ":3306", "tunnel", "192.0.2.2")
    assert one_tunnel(h1)["type"] == "ipsec"
    marker = b"WORMHOLE-MARKER-" + secrets.token_hex(16).encode()
    with capture(h1, veth_name(h1, h2)) as cap:
        assert roundtrip(h1, 3306, marker * 4) == marker * 4
    assert not [p for p in cap.packets if p.src == "192.0.2.1" and marker in p.raw]
    assert_only_esp_leaves(cap, "192.0.2.1")
    h1.ok("delete", "db")
    h1.ok("tunnel-delete", "192.0.2.2")
    assert_nothing_left(h1, h2)


@pytest.mark.parametrize("udp", [pytest.param(False, marks=pytest.mark.full), True], ids=["esp", "esp-in-udp"])
def test_rekey_under_a_running_transfer(pair, udp):
    """New keys and SPIs on both ends while a TCP stream runs through the tunnel: the stream
    ends intact."""
    h1, h2 = pair
    opts = ("--type", "ipsec") + (("--udp",) if udp else ())
    src, dst = tunnel_create(h1, "192.0.2.2", *opts)
    before = one_tunnel(h1)
    h2.echo_server(7400, host=dst)
    data = os.urandom(4 * MiB)
    got = []
    with h1.connect(7400, dst, timeout=60) as s:
        reader = threading.Thread(target=lambda: got.append(recv_all(s)))
        reader.start()
        half = len(data) // 2
        s.sendall(data[:half])
        h1.ok("tunnel-create", "--rekey", *opts, "192.0.2.2")
        s.sendall(data[half:])
        s.shutdown(socket.SHUT_WR)
        reader.join(60)
    assert got and got[0] == data, "the stream survived the rekey"
    after = one_tunnel(h1)
    assert after["spi_in"] != before["spi_in"] and after["spi_out"] != before["spi_out"]
    assert xfrm_counts(h1) == xfrm_counts(h2) == (2, 3), "the old SAs are gone"
    assert_ping(h1, dst)


@pytest.mark.parametrize("udp", [False, pytest.param(True, marks=pytest.mark.full)], ids=["esp", "esp-in-udp"])
def test_ipsec_tunnel_rediscovered_after_restart(pair, udp):
    h1, h2 = pair
    opts = ("--type", "ipsec") + (("--udp",) if udp else ())
    _, dst = tunnel_create(h1, "192.0.2.2", *opts)
    assert h1.stop() == 0
    if not udp:  # plain ESP needs no daemon; ESP-in-UDP needs its socket, which the daemon holds
        assert_ping(h1, dst, "while the daemon is down")
    h1.start()
    assert one_tunnel(h1)["state"] == "up"
    assert_ping(h1, dst, "after the restart")
    assert xfrm_counts(h1) == (2, 3)


@pytest.mark.parametrize("script,expect", [("ex5-tunnel-mysql.sh", "echo: hello mysql"),
                                           ("ex8-tunnel.sh", "packets transmitted")])
def test_readme_examples_over_ipsec(make_host, script, expect):
    """README examples 5 (a container on the far host) and 8 with --tunnel-type ipsec; example 5
    needs a Docker engine in the lab."""
    from test_docker import run_example
    h1, h2 = linked(make_host, ("--tunnel-type", "ipsec"), ("--tunnel-type", "ipsec"))
    out = run_example(h1, script, {"MYSERVER": "192.0.2.2", "WORMHOLE_HOST": h1.sock,
                                   "MYSERVER_DOCKER": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")})
    assert expect in out
    h1.wormhole("tunnel-delete", "192.0.2.2")  # example 5 leaves its tunnel up, as tunnels outlive wormholes
    assert xfrm_counts(h1) == xfrm_counts(h2) == (0, 0)
    assert_nothing_left(h1, h2)


def test_stray_states_are_removed_at_start(pair):
    h1, h2 = pair
    tunnel_create(h1, "192.0.2.2", "--type", "ipsec")
    assert h1.stop() == 0
    for record in h1.tunnel_records():
        record.unlink()
    h1.start()
    assert xfrm_counts(h1) == (0, 0), h1.logs()
    assert [line for line in h1.logs().splitlines() if "removed ipsec reqid" in line]
