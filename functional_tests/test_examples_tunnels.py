"""README examples 5-8 (tunnels) as scripts, run on two test hosts joined by veth that share
one Docker engine: h1 runs the example, h2 is its MYSERVER."""

import ipaddress
import json
import os
import re
import signal
from pathlib import Path

import docker
import pytest

from harness import ROOT, veth
from test_docker import engine, ours, sweep  # noqa: F401 (fixtures)

MYSERVER = "192.0.2.2"
DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def tunnels(host):
    return json.loads(host.ok("tunnel-list", "--json"))


def netns_procs(ns):
    """{pid: comm} of the processes in ns's network namespace."""
    there = os.stat(f"/run/netns/{ns.name}")
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            st = os.stat(d / "ns" / "net")
            comm = (d / "comm").read_text().strip()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (there.st_dev, there.st_ino):
            found[int(d.name)] = comm
    return found


def tunnel_leftovers(host):
    """What a tunnel leaves on a host: wh-* interfaces, wireguard-go processes, records."""
    links = host.exec("ip", "-o", "link", "show").stdout
    ifaces = re.findall(r"^\d+: (wh-[0-9a-f]+)[:@]", links, re.M)
    procs = [pid for pid, comm in netns_procs(host).items() if comm.startswith("wireguard")]
    records = sorted(p.name for p in (host.state / "tunnels").glob("*"))
    return ifaces, procs, records


@pytest.fixture
def pair(make_host, engine, sweep):  # noqa: F811
    """h1 (192.0.2.1) <-> h2 (192.0.2.2), same key; afterwards, whatever happened: no tunnel
    left on either (deleted with --force, then wireguard-go ended by pid), no containers."""
    h1, h2 = make_host(key="k"), make_host(key="k")
    sweep(h1)
    sweep(h2)
    veth(h1, "192.0.2.1/24", h2, "192.0.2.2/24")
    yield h1, h2
    for host in (h1, h2):
        if host.daemon is not None and host.daemon.poll() is None:
            r = host.wormhole("tunnel-list", "--json")
            for t in json.loads(r.stdout) if r.returncode == 0 else []:
                host.wormhole("tunnel-delete", "--force", t["peer"])
        for pid in tunnel_leftovers(host)[1]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_example(ns, script, timeout=180):
    env = {**os.environ, "MYSERVER": MYSERVER, "MYSERVER_DOCKER": DOCKER_HOST}
    r = ns.exec(str(ROOT / "examples" / script), env=env, timeout=timeout)
    assert r.returncode == 0, f"{script} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def assert_nothing_left(engine, h1, h2):  # noqa: F811
    assert h1.list() == [] and h2.list() == [], "the example deletes its wormholes"
    assert ours(engine, h1) == [] and ours(engine, h2) == [], "and the containers they started"


@pytest.mark.parametrize("script,expect", [
    ("ex5-tunnel-mysql.sh", "echo: hello mysql"),
    ("ex6-tunnel-on-demand.sh", "echo: hello mysql"),
    ("ex7-wordpress-tunnel-mysql.sh", "page: wordpress: database ok"),
])
def test_readme_examples_over_a_tunnel(pair, engine, script, expect):  # noqa: F811
    h1, h2 = pair
    r = run_example(h1, script)
    assert expect in r.stdout
    assert_nothing_left(engine, h1, h2)
    # ex5 runs its mysql itself (`docker -H myserver run -d`) and removes it
    for cid in re.findall(r"docker-ns ([0-9a-f]{64})", r.stderr):
        with pytest.raises(docker.errors.NotFound):
            engine.containers.get(cid)
    # The tunnel outlives the wormhole that made it, idle now, with traffic counted.
    [near], [far] = tunnels(h1), tunnels(h2)
    assert near["peer"] == MYSERVER and near["state"] == far["state"] == "up"
    assert near["users"] == far["users"] == []
    assert (near["local_ip"], near["remote_ip"]) == (far["remote_ip"], far["local_ip"])
    assert near["rx_bytes"] > 0 and near["tx_bytes"] > 0
    # While the wormhole was up (the script's `list` and `tunnel-list`): its tail was the
    # child on MYSERVER's overlay address, and the tunnel named it as a user.
    ident = re.search(r"^  -> (\S+) ", r.stderr, re.M).group(1)
    tail = rf"tcp://{re.escape(near['remote_ip'])}:\d+"
    assert re.search(rf"^{re.escape(ident)}(\.1)? .* {tail} ", r.stdout, re.M), r.stdout
    [row] = [line for line in r.stdout.splitlines() if line.startswith(MYSERVER + " ")]
    assert ident in row and f"{near['local_ip']}-{near['remote_ip']}" in row, r.stdout
    h1.ok("tunnel-delete", MYSERVER)
    assert tunnels(h1) == [] and tunnels(h2) == []
    assert tunnel_leftovers(h1) == ([], [], []) and tunnel_leftovers(h2) == ([], [], [])


def test_readme_example_8_just_a_tunnel(pair):
    h1, h2 = pair
    r = run_example(h1, "ex8-tunnel.sh")
    m = re.search(r"^tunnel: (\S+) (\S+)$", r.stdout, re.M)
    assert m, r.stdout
    src, dst = m.groups()
    overlay = ipaddress.ip_network("100.64.0.0/14")
    assert ipaddress.ip_address(src) in overlay and ipaddress.ip_address(dst) in overlay and src != dst
    assert re.search(rf"^route: {re.escape(dst)} dev wh-[0-9a-f]{{10}} .*src {re.escape(src)} ", r.stdout, re.M)
    assert re.search(r"3 packets transmitted, 3 (packets )?received", r.stdout), r.stdout
    assert "+ wormhole tunnel-delete " + MYSERVER in r.stderr
    assert tunnels(h1) == [] and tunnels(h2) == [], "the example deletes its tunnel"
    assert tunnel_leftovers(h1) == ([], [], []) and tunnel_leftovers(h2) == ([], [], [])
    assert h1.list() == [] and h2.list() == []
