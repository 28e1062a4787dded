"""Unit tests for the pure functions of bench/run.py and bench/tunnel.py: .venv/bin/python -m pytest bench/test_parse.py"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

from run import (  # noqa: E402
    BenchError, Row, format_table, parse_create_output, parse_iperf3, parse_only,
    parse_wrk, rows_to_json, tcp_table,
)

# Real wrk 4.1.0 output (Debian 12), -t1 -c50 -d1s -H 'Connection: close'.
WRK_OK = """\
Running 1s test @ http://127.0.0.1:15210/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.29ms  794.91us   4.88ms   62.76%
    Req/Sec    13.83k     2.22k   16.25k    70.00%
  13734 requests in 1.00s, 1.89MB read
Requests/sec:  13698.63
Transfer/sec:      1.88MB
"""

WRK_ERRORS = """\
Running 5s test @ http://127.0.0.1:40001/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    1.20ms  20.00ms   80.00%
    Req/Sec     3.02k   300.00     3.50k    70.00%
  15100 requests in 5.00s, 2.07MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:   3019.80
Transfer/sec:    424.00KB
"""


def iperf3_json(bps=1.5e10, **extra):
    doc = {
        "start": {"connected": [{"socket": 5}]},
        "intervals": [],
        "end": {
            "sum_sent": {"bytes": 9_375_000_000, "bits_per_second": bps * 1.01},
            "sum_received": {"bytes": 9_375_000_000, "bits_per_second": bps},
        },
    }
    doc.update(extra)
    return json.dumps(doc)


# -- iperf3 -----------------------------------------------------------------

def test_iperf3_reads_received_rate():
    assert parse_iperf3(iperf3_json(18_467_000_000.5)) == 18_467_000_000.5


def test_iperf3_integer_rate():
    assert parse_iperf3(iperf3_json(1000)) == 1000.0


def test_iperf3_error_field():
    text = json.dumps({"start": {}, "intervals": [], "end": {},
                       "error": "unable to connect to server: Connection refused"})
    with pytest.raises(BenchError, match="Connection refused"):
        parse_iperf3(text)


def test_iperf3_error_wins_over_partial_results():
    with pytest.raises(BenchError, match="control socket has closed"):
        parse_iperf3(iperf3_json(error="control socket has closed unexpectedly"))


@pytest.mark.parametrize("text", ["", "iperf3: error - boom", "[1, 2]"])
def test_iperf3_not_json(text):
    with pytest.raises(BenchError):
        parse_iperf3(text)


@pytest.mark.parametrize("end", [{}, {"sum_received": {}}, {"sum_received": None},
                                 {"sum_received": {"bits_per_second": "fast"}},
                                 {"sum_received": {"bits_per_second": True}}])
def test_iperf3_missing_or_bad_rate(end):
    with pytest.raises(BenchError):
        parse_iperf3(json.dumps({"end": end}))


# -- wrk ----------------------------------------------------------------------

def test_wrk_clean_run():
    r = parse_wrk(WRK_OK)
    assert r.requests_per_sec == 13698.63
    assert r.requests == 13734
    assert (r.socket_errors, r.non_2xx) == (0, 0)


def test_wrk_errors_are_summed():
    r = parse_wrk(WRK_ERRORS)
    assert r.requests_per_sec == 3019.80
    assert r.requests == 15100
    assert r.socket_errors == 16
    assert r.non_2xx == 7


def test_wrk_scaled_rate():
    r = parse_wrk("  150 requests in 1.00s, 1KB read\nRequests/sec:      1.23k\n")
    assert r.requests_per_sec == pytest.approx(1230)


def test_wrk_zero_rate():
    r = parse_wrk("  0 requests in 5.00s, 0.00B read\n"
                  "  Socket errors: connect 0, read 50, write 0, timeout 0\n"
                  "Requests/sec:      0.00\nTransfer/sec:       0.00B\n")
    assert r.requests_per_sec == 0
    assert r.socket_errors == 50


@pytest.mark.parametrize("text", ["", "unable to connect to 127.0.0.1:1 Connection refused\n",
                                  "Requests/sec: lots\n"])
def test_wrk_unreadable(text):
    with pytest.raises(BenchError):
        parse_wrk(text)


# -- wormhole create ------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("4f1c tcp://127.0.0.1:3306\n", ("4f1c", "127.0.0.1", 3306)),
    ("myid 127.0.0.1:40000", ("myid", "127.0.0.1", 40000)),
    ("x tcp://ns1@10.0.0.1:80", ("x", "10.0.0.1", 80)),
    ("x tcp://[::1]:80", ("x", "::1", 80)),
    ("x tcp://:80", ("x", "127.0.0.1", 80)),
])
def test_create_output(text, expected):
    assert parse_create_output(text) == expected


@pytest.mark.parametrize("text", ["", "onlyid", "id url extra", "id tcp://127.0.0.1"])
def test_create_output_bad(text):
    with pytest.raises(BenchError):
        parse_create_output(text)


# -- --only ---------------------------------------------------------------------

def test_only_default_is_every_row():
    assert parse_only(None) == ["direct", "wormhole", "wormhole-python", "systemd-socket-proxyd", "haproxy",
                                "socat", "tunnel"]


def test_only_keeps_direct_and_table_order():
    assert parse_only("socat,wormhole") == ["direct", "wormhole", "socat"]
    assert parse_only("wormhole-python,haproxy") == ["direct", "wormhole-python", "haproxy"]
    assert parse_only("haproxy socat") == ["direct", "haproxy", "socat"]


def test_only_tunnel_runs_no_proxy_row():
    assert parse_only("tunnel") == ["tunnel"]
    assert parse_only("tunnel,socat") == ["direct", "socat", "tunnel"]
    assert parse_only("direct") == ["direct"]
    assert parse_only("direct,tunnel") == ["direct", "tunnel"]


def test_required_tools_follow_the_selection():
    from run import PROXY_TOOLS, required_tools
    from tunnel import TOOLS
    assert required_tools(["tunnel"], TOOLS) == list(TOOLS)
    assert required_tools(["direct", "socat"], TOOLS) == list(PROXY_TOOLS)
    both = required_tools(["direct", "socat", "tunnel"], TOOLS)
    assert both.count("iperf3") == 1 and {"wrk", "wireguard-go", "wg"} <= set(both)


def test_only_unknown_name():
    with pytest.raises(ValueError, match="nginx"):
        parse_only("wormhole,nginx")


# -- table and JSON ---------------------------------------------------------------

ROWS = [
    Row("direct", bps=20e9, conn_per_s=14000.0),
    Row("wormhole", error="wormholed did not answer ping within 10 s"),
    Row("haproxy", bps=10e9, conn_per_s=None, notes={"conn/s": "haproxy exited with 1"}),
    Row("socat", bps=5e9, conn_per_s=1750.0),
]


def test_table_values_and_ratios():
    lines = tcp_table(ROWS).splitlines()
    direct = next(l for l in lines if l.startswith("direct"))
    socat = next(l for l in lines if l.startswith("socat"))
    assert direct.split() == ["direct", "20.00", "1.00", "14000", "1.00", "-", "-", "-", "n/a"]
    assert socat.split() == ["socat", "5.00", "0.25", "1750", "0.12", "-", "-", "-", "n/a"]


def test_table_unavailable_row_and_footnotes():
    text = tcp_table(ROWS, header="HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    assert "wormhole" in text and "n/a (wormholed did not answer ping within 10 s)" in text
    haproxy = next(l for l in lines if l.startswith("haproxy"))
    assert haproxy.split() == ["haproxy", "10.00", "0.50", "n/a", "[1]", "n/a", "-", "-", "-", "n/a"]
    assert lines[-1] == "[1] haproxy conn/s: haproxy exited with 1"


def test_table_columns_align():
    for text in (tcp_table(ROWS), run.idle_table(ROWS), run.ratio_table(ROWS)):
        lines = [l for l in text.splitlines() if l.startswith(("proxy", "direct", "socat", "---"))]
        assert len(lines) == 4 and len({len(l) for l in lines}) == 1, text


def test_table_without_direct_has_no_ratios():
    line = tcp_table([Row("socat", bps=5e9, conn_per_s=1750.0)]).splitlines()[-1]
    assert line.split() == ["socat", "5.00", "n/a", "1750", "n/a", "-", "-", "-", "n/a"]


def test_json():
    doc = json.loads(rows_to_json(ROWS, {"nproc": 2}))
    assert doc["nproc"] == 2
    by_name = {r["name"]: r for r in doc["rows"]}
    assert by_name["socat"]["throughput_ratio"] == 0.25
    assert by_name["socat"]["conn_ratio"] == 0.125
    assert by_name["wormhole"]["error"].startswith("wormholed")
    assert by_name["haproxy"]["conn_per_s"] is None and by_name["haproxy"]["conn_ratio"] is None


def test_proc_cpu_seconds_sums_own_and_reaped_children_time():
    from run import proc_cpu_seconds
    # pid (comm with ) spaces) state ppid ... utime=14 stime=15 cutime=16 cstime=17 (1-based fields)
    stat = "42 (a ) b) S 1 1 1 0 -1 4194560 100 0 0 0 250 50 30 20 20 0 1 0 100 0 0"
    assert proc_cpu_seconds(stat, 100) == (250 + 50 + 30 + 20) / 100


def test_table_shows_proxy_cpu_and_keepalive():
    rows = [Row("direct", bps=2e10, conn_per_s=14000, keepalive_per_s=80000),
            Row("wormhole", bps=1e10, conn_per_s=7000, cpu_s_per_gb=0.3, cpu_us_per_conn=155.4,
                keepalive_per_s=60000)]
    line = next(l for l in tcp_table(rows).splitlines() if l.startswith("wormhole"))
    assert line.split() == ["wormhole", "10.00", "0.50", "7000", "0.50", "0.300", "155", "60000", "0.75"]


# -- keep-alive, idle connections, UDP, ping: parsers -----------------------------------

@pytest.mark.parametrize("text, ms", [("3.125\n", 3.125), ("12", 12.0)])
def test_ping(text, ms):
    assert run.parse_ping(text) == ms


@pytest.mark.parametrize("text", ["", "wormhole: error: no daemon", "3.1 ms"])
def test_ping_bad(text):
    with pytest.raises(BenchError):
        run.parse_ping(text)


def test_udp_client():
    text = json.dumps({"received": 90000, "seconds": 3.0, "stalls": 0, "refused": 0, "window": 32, "size": 64,
                       "client_cpu": 0.45})
    assert run.parse_udp_client(text + "\n") == (30000, 0.45)
    assert run.parse_udp_client('{"received": 10, "seconds": 2.0}') == (5, None)


@pytest.mark.parametrize("text, match", [
    ('{"error": "no echo within 5 s"}', "no echo within 5 s"),
    ('{"received": 0, "seconds": 3.0}', "no echo came back"),
    ('{"seconds": 3.0}', "no received"), ("Traceback", "not JSON"), ("[]", "not a JSON object"),
])
def test_udp_client_bad(text, match):
    with pytest.raises(BenchError, match=match):
        run.parse_udp_client(text)


def test_status():
    assert run.parse_status("accepted 8001 open 8000\n") == {"accepted": 8001, "open": 8000}
    assert run.parse_status("connected 5 failed 0 closed 1") == {"connected": 5, "failed": 0, "closed": 1}
    for bad in ("", "accepted", "accepted x"):
        with pytest.raises(BenchError):
            run.parse_status(bad)


# /proc/slabinfo (Linux 6.18), shortened
SLABINFO = """\
slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
tw_sock_TCP        76582  90960    256   16    1 : tunables    0    0    0 : slabdata   5685   5685      0
request_sock_TCP      24     24    320   12    1 : tunables    0    0    0 : slabdata      2      2      0
TCP                   53    104   2368   13    8 : tunables    0    0    0 : slabdata      8      8      0
sock_inode_cache     178    247    832   19    4 : tunables    0    0    0 : slabdata     13     13      0
proc_inode_cache     971   1886    696   23    4 : tunables    0    0    0 : slabdata     82     82      0
filp                 618    819    192   21    1 : tunables    0    0    0 : slabdata     39     39      0
dentry             93514  95802    192   21    1 : tunables    0    0    0 : slabdata   4562   4562      0
"""


def test_slabinfo_counts_objects_in_use_without_time_wait_or_proc_inodes():
    caches = run.parse_slabinfo(SLABINFO)
    assert caches == {"TCP": 53 * 2368, "sock_inode_cache": 178 * 832, "filp": 618 * 192,
                      "dentry": (93514 - 971) * 192}  # a dentry left out with each /proc inode


def test_slabinfo_unreadable():
    with pytest.raises(BenchError):
        run.parse_slabinfo("slabinfo - version: 2.1\n")
    with pytest.raises(BenchError):
        run.parse_slabinfo("TCP x y z\n")


def test_sockstat_tcp_mem():
    text = ("sockets: used 16\nTCP: inuse 7 orphan 0 tw 76530 alloc 7 mem 4736\n"
            "UDP: inuse 0 mem 0\nUDPLITE: inuse 0\n")
    assert run.parse_sockstat_tcp_mem(text) == 4736
    with pytest.raises(BenchError):
        run.parse_sockstat_tcp_mem("UDP: inuse 0 mem 0\n")


def test_proc_files():
    limits = ("Limit                     Soft Limit           Hard Limit           Units     \n"
              "Max processes             96365                96365                processes \n"
              "Max open files            20000                524288               files     \n")
    assert run.parse_nofile_limit(limits) == 20000
    assert run.parse_nofile_limit("Max open files            unlimited            unlimited            files") is None
    assert run.status_rss_kib("Name:\tpython3\nVmHWM:\t  9000 kB\nVmRSS:\t    2080 kB\n") == 2080
    assert run.status_rss_kib("Name:\tzombie\n") == 0
    assert run.proc_pgrp("18544 (a ) b) R 18536 18530 6401 0 -1 4194304 99 0") == 18530


def test_udp_bound():
    text = ("   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "13905: 0100007F:A21C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2443333 2\n")
    assert run.udp_bound(text, 0xA21C)
    assert not run.udp_bound(text, 0xA21D)
    assert not run.udp_bound(text.splitlines()[0], 0xA21C)


def test_percentile_nearest_rank():
    values = [float(v) for v in range(30, 0, -1)]  # 30 pings, any order
    assert run.percentile(values, 50) == 15 and run.percentile(values, 95) == 29
    assert run.percentile([4.2], 95) == 4.2


def test_row_medians_and_idle_sum():
    row = Row("wormhole")
    for bps in (3e9, 1e9, 2e9):
        row.add("bps", bps)
    row.add("keepalive_per_s", None)  # a failed run adds nothing
    row.settle()
    assert row.bps == 2e9 and row.keepalive_per_s is None and row.samples["bps"] == [3e9, 1e9, 2e9]
    row.idle_proc_kib, row.idle_kernel_kib = 0.5, 7.25
    assert row.idle_kib == 7.75
    direct = Row("direct", idle_kernel_kib=7.8)
    assert direct.idle_kib is None, "direct has no proxy: its kernel figure is the baseline"


# -- the idle/UDP/ping table, the ratios, the goals ---------------------------------------

def _full_rows():
    return [
        Row("direct", bps=20e9, conn_per_s=12000, keepalive_per_s=100000, idle_kernel_kib=7.8,
            udp_per_s=100000),
        Row("wormhole", bps=16e9, conn_per_s=9000, cpu_us_per_conn=40, keepalive_per_s=60000,
            idle_proc_kib=0.2, idle_kernel_kib=7.6, idle_fds=2.0, idle_conns=8000, udp_per_s=30000,
            ping_ms=[3.0] * 20 + [9.0] * 10),
        Row("wormhole-python", bps=12e9, conn_per_s=4000, cpu_us_per_conn=200, keepalive_per_s=40000,
            idle_proc_kib=1.0, idle_kernel_kib=10.4, idle_fds=6.0, idle_conns=3330,
            notes={"idle": "3330 connections, not 8000: 6.0 fds each and RLIMIT_NOFILE 20000"},
            ping_ms=[6.0] * 30),
        Row("systemd-socket-proxyd", bps=15e9, conn_per_s=5000, cpu_us_per_conn=150, keepalive_per_s=30000),
        Row("haproxy", bps=10e9, conn_per_s=8000, cpu_us_per_conn=50, keepalive_per_s=50000,
            idle_proc_kib=3.3, idle_kernel_kib=7.7, idle_fds=2.0),
        Row("socat", bps=5e9, conn_per_s=1000, keepalive_per_s=20000, udp_per_s=25000),
    ]


def test_idle_table():
    lines = run.idle_table(_full_rows()).splitlines()
    line = {l.split()[0]: l.split() for l in lines if l and not l.startswith(("-", "[", "proxy"))}
    assert line["direct"] == ["direct", "-", "-", "7.8", "-", "100000", "1.00", "-", "-"]
    assert line["wormhole"] == ["wormhole", "7.8", "0.2", "7.6", "2.00", "30000", "0.30", "3.0", "9.0"]
    assert line["wormhole-python"][:3] == ["wormhole-python", "11.4", "[1]"]
    assert line["haproxy"] == ["haproxy", "11.0", "3.3", "7.7", "2.00", "-", "n/a", "-", "-"]
    assert lines[-1] == "[1] wormhole-python idle: 3330 connections, not 8000: 6.0 fds each and RLIMIT_NOFILE 20000"


def test_ratio_table_against_proxyd_haproxy_and_socat():
    text = run.ratio_table(_full_rows(), "HEADER\n")
    lines = text.splitlines()
    assert lines[0] == "HEADER" and lines[1] == ""
    assert lines[2].split() == ["throughput", "conn/s", "keep-alive", "req/s", "CPU", "us/conn", "UDP"]
    wh = next(l for l in lines if l.startswith("wormhole "))
    # throughput /proxyd /haproxy, conn/s ..., keep-alive ..., CPU us/conn /haproxy, UDP /socat
    assert wh.split()[1:] == ["1.07", "1.60", "1.80", "1.12", "2.00", "1.20", "0.80", "1.20"]
    hap = next(l for l in lines if l.startswith("haproxy"))
    assert hap.split()[1:] == ["0.67", "1.00", "1.60", "1.00", "1.67", "1.00", "1.00", "n/a"]


def test_goals():
    goals = dict(run.judge_goals(_full_rows()))
    wh, py = ({label: cells[name] for label, cells in goals.items()} for name in ("wormhole", "wormhole-python"))
    assert wh["conn/s >= 1.0x haproxy"] == ("1.12x", True)
    assert py["conn/s >= 1.0x haproxy"] == ("0.50x", False)
    assert wh["CPU us/conn <= haproxy's"] == ("40 vs 50", True)
    assert wh["keep-alive req/s >= 1.2x haproxy"] == ("1.20x", True)  # judged as shown
    assert wh["idle KiB/conn (process + kernel) <= 8"] == ("7.8", True)
    assert py["idle KiB/conn (process + kernel) <= 8"] == ("11.4", False)
    assert wh["idle fds/conn <= 2"] == ("2.00", True) and py["idle fds/conn <= 2"] == ("6.00", False)
    assert wh["throughput >= 0.75x direct"] == ("0.80x", True)
    assert wh["throughput >= 1.0x systemd-socket-proxyd"] == ("1.07x", True)
    assert wh["wormhole ping p50 <= 5 ms"] == ("3.0", True) and py["wormhole ping p50 <= 5 ms"] == ("6.0", False)
    assert wh["UDP dgram/s >= 1.25x socat"] == ("1.20x", False)
    assert py["UDP dgram/s >= 1.25x socat"] == ("-", None)


def test_goals_without_an_anchor_or_a_figure():
    rows = [r for r in _full_rows() if r.name not in ("haproxy", "wormhole-python")]
    rows[1].ping_ms = []
    cells = {label: c["wormhole"] for label, c in run.judge_goals(rows)}
    assert cells["conn/s >= 1.0x haproxy"] is None and cells["CPU us/conn <= haproxy's"] is None
    assert cells["wormhole ping p50 <= 5 ms"] is None
    text = run.goals_table(rows)
    assert "wormhole-python" not in text
    line = next(l for l in text.splitlines() if l.startswith("conn/s"))
    assert line.split()[-1] == "n/a"


def test_goals_table():
    lines = run.goals_table(_full_rows(), "GOALS").splitlines()
    assert lines[0] == "GOALS" and lines[1].split() == ["goal", "wormhole", "wormhole-python"]
    conn = next(l for l in lines if l.startswith("conn/s"))
    assert conn.split()[-4:] == ["1.12x", "ok", "0.50x", "MISS"]
    udp = next(l for l in lines if l.startswith("UDP"))
    assert udp.endswith("-") and "socat ok" not in udp
    assert len({len(l) for l in lines[1:]}) == 1, "columns align"
    assert run.goals_table([Row("direct"), Row("haproxy")]) == ""


def test_format_table_has_every_table():
    text = format_table(_full_rows(), "HEADER\n")
    assert text.startswith("HEADER\nthroughput: iperf3")
    for part in ("idle KiB/conn", "/proxyd", "goal "):
        assert part in text


def test_json_new_columns():
    doc = json.loads(rows_to_json(_full_rows(), {"nproc": 2}))
    wh = {r["name"]: r for r in doc["rows"]}["wormhole"]
    assert wh["keepalive_per_s"] == 60000 and wh["ratios"]["keepalive_per_s"]["haproxy"] == 1.2
    assert wh["idle_kib_per_conn"] == pytest.approx(7.8) and wh["idle_fds_per_conn"] == 2.0
    assert wh["udp_ratio_socat"] == 1.2 and wh["ping_p50_ms"] == 3.0 and wh["ping_p95_ms"] == 9.0
    goal = next(g for g in doc["goals"] if g["goal"] == "conn/s >= 1.0x haproxy")
    assert goal["rows"]["wormhole"] == {"figure": "1.12x", "ok": True}


# -- tunnel table (bench/tunnel.py) --------------------------------------------------

import tunnel  # noqa: E402
from tunnel import (  # noqa: E402
    TunnelRow, abba, cli_message, format_tunnel_table, iface_with_address, ns_pid_of,
    parse_ip_link, parse_listening, parse_tunnel_create, parse_tunnel_list, tunnel_mtu,
    tunnel_ratio, tunnel_to_json,
)


@pytest.mark.parametrize("text, expected", [
    ("100.64.1.2 100.64.1.3\n", ("100.64.1.2", "100.64.1.3")),
    ("  100.65.0.1   100.65.0.2", ("100.65.0.1", "100.65.0.2")),
    ("fd00::1 fd00::2\n", ("fd00::1", "fd00::2")),
])
def test_tunnel_create_output(text, expected):
    assert parse_tunnel_create(text) == expected


@pytest.mark.parametrize("text", ["", "100.64.1.2", "100.64.1.2 100.64.1.3 extra",
                                  "wh-0123456789 100.64.1.3", "100.64.1.2 100.64.1.2",
                                  "100.64.1.2/32 100.64.1.3/32"])
def test_tunnel_create_output_bad(text):
    with pytest.raises(BenchError):
        parse_tunnel_create(text)


TUNNEL_LIST = json.dumps([
    {"peer": "192.0.2.9", "peer_id": "x", "type": "wireguard", "backend": "kernel",
     "interface": "wh-9999999999", "local_ip": "100.64.1.4", "remote_ip": "100.64.1.5"},
    {"peer": "198.18.0.2", "peer_id": "d2", "type": "wireguard", "backend": "wireguard-go",
     "interface": "wh-0123456789", "local_ip": "100.64.1.2", "remote_ip": "100.64.1.3",
     "local_endpoint": "198.18.0.1:4500", "remote_endpoint": "198.18.0.2:4500",
     "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0, "users": [], "state": "up"},
])


def test_tunnel_list_finds_the_peer():
    entry = parse_tunnel_list(TUNNEL_LIST, "198.18.0.2")
    assert entry["interface"] == "wh-0123456789" and entry["backend"] == "wireguard-go"


@pytest.mark.parametrize("text, match", [
    (TUNNEL_LIST.replace("198.18.0.2", "198.18.0.3"), "no tunnel to 198.18.0.2"),
    ("[]", "no tunnel"), ("{}", "not a list"), ("Usage: wormhole", "not JSON"),
])
def test_tunnel_list_bad(text, match):
    with pytest.raises(BenchError, match=match):
        parse_tunnel_list(text, "198.18.0.2")


@pytest.mark.parametrize("stderr, stdout, rc, expected", [
    ("wormhole: error: host 198.18.0.2 cannot build WireGuard tunnels: no wireguard-go\n", "", 1,
     "host 198.18.0.2 cannot build WireGuard tunnels: no wireguard-go"),
    ("Usage: wormhole [OPTIONS] COMMAND [ARGS]...\n\nwormhole: No such command 'tunnel-create'.\n", "", 2,
     "No such command 'tunnel-create'."),
    ("", "something on stdout\n", 1, "something on stdout"),
    ("", "", 3, "exit status 3"),
])
def test_cli_message(stderr, stdout, rc, expected):
    assert cli_message(stderr, stdout, rc) == expected


# `ip -j -s link show dev IFACE` of a wireguard-go interface (iproute2 6.1), shortened
IP_LINK = json.dumps([{
    "ifindex": 5, "ifname": "wh-0123456789", "flags": ["POINTOPOINT", "MULTICAST", "NOARP", "UP",
                                                        "LOWER_UP"],
    "mtu": 1420, "qdisc": "pfifo_fast", "operstate": "UNKNOWN", "link_type": "none",
    "stats64": {"rx": {"bytes": 6122982, "packets": 95658, "errors": 0, "dropped": 0},
                "tx": {"bytes": 727324556, "packets": 512258, "errors": 0, "dropped": 0}}}])


def test_ip_link():
    assert parse_ip_link(IP_LINK) == {"ifname": "wh-0123456789", "mtu": 1420,
                                      "tx_bytes": 727324556, "rx_bytes": 6122982}


@pytest.mark.parametrize("text", ["", "[]", IP_LINK.replace('"stats64"', '"stats"'),
                                  'Device "x" does not exist.'])
def test_ip_link_bad(text):
    with pytest.raises(BenchError):
        parse_ip_link(text)


IP_ADDR = json.dumps([
    {"ifindex": 1, "ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifindex": 2, "ifname": "whb123a", "addr_info": [{"family": "inet", "local": "198.18.0.1",
                                                       "prefixlen": 24}]},
    {"ifindex": 5, "ifname": "wh-0123456789", "addr_info": [{"family": "inet", "local": "100.64.1.2",
                                                             "prefixlen": 32}]},
    {"ifindex": 6, "ifname": "down0"},
])


def test_iface_with_address():
    assert iface_with_address(IP_ADDR, "100.64.1.2") == "wh-0123456789"
    assert iface_with_address(IP_ADDR, "198.18.0.1") == "whb123a"
    with pytest.raises(BenchError, match="no interface has the address 100.64.1.3"):
        iface_with_address(IP_ADDR, "100.64.1.3")
    with pytest.raises(BenchError):
        iface_with_address("not json", "100.64.1.2")


def test_listening():
    text = ("LISTEN 0      4096   198.19.0.2:5201 0.0.0.0:*\n"
            "LISTEN 0      128    127.0.0.1:9999  0.0.0.0:*\n")
    assert parse_listening(text, "198.19.0.2", 5201)
    assert not parse_listening(text, "198.19.0.2", 520)
    assert not parse_listening(text, "198.19.0.1", 5201)
    assert not parse_listening("", "198.19.0.2", 5201)


def test_mtu_rule_and_order():
    assert tunnel_mtu(1500) == 1420
    assert abba(("A", "B"), 2) == ["A", "B", "B", "A"]
    assert abba(["A", "B"], 4) == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert abba(["B"], 2) == ["B", "B"]


def test_ns_pid_of():
    assert ns_pid_of("whbench4321a") == 4321
    assert ns_pid_of("whbench4321b") == 4321
    assert ns_pid_of("whbench4321") is None
    assert ns_pid_of("wh4284x39") is None


def _tunnel_rows(wormhole_bps=(0.96e9, 0.98e9)):
    return [
        TunnelRow("hand-built", samples=[1.0e9, 1.0e9], mtu=1420, cpu_s_per_gb=4.5),
        TunnelRow("wormhole", samples=list(wormhole_bps), mtu=1420, cpu_s_per_gb=4.6,
                  create_s=[0.5, 0.3, 0.4], create_first_s=0.9),
    ]


def test_tunnel_table_ratio_goal_and_create_median():
    lines = format_tunnel_table(_tunnel_rows(), "HEADER").splitlines()
    assert lines[0] == "HEADER"
    hand = next(l for l in lines if l.startswith("hand-built"))
    wh = next(l for l in lines if l.startswith("wormhole"))
    assert hand.split() == ["hand-built", "1.00", "1.00", "-", "1420", "-", "4.50"]
    assert wh.split() == ["wormhole", "0.97", "0.97", ">=0.95", "ok", "1420", "0.400", "4.60"]
    assert len({len(l) for l in lines[1:]}) == 1, "columns align"


def test_tunnel_table_goal_missed():
    wh = format_tunnel_table(_tunnel_rows((0.9e9,))).splitlines()[-1]
    assert wh.split()[1:5] == ["0.90", "0.90", ">=0.95", "MISS"]


def test_tunnel_table_wormhole_unavailable():
    rows = [TunnelRow("hand-built", samples=[1e9]),
            TunnelRow("wormhole", error="tunnel-create failed: No such command 'tunnel-create'.")]
    text = format_tunnel_table(rows)
    assert "wormhole    n/a (tunnel-create failed: No such command 'tunnel-create'.)" in text
    assert tunnel_ratio(rows) is None


def test_tunnel_table_hand_built_unavailable_and_footnotes():
    rows = [TunnelRow("hand-built", error="wireguard-go exited with 1: boom"),
            TunnelRow("wormhole", samples=[1e9], notes={"tunnel-create": "tunnel-delete failed: busy",
                                                        "throughput": "iperf3 exited with 1: x"})]
    lines = format_tunnel_table(rows).splitlines()
    wh = next(l for l in lines if l.startswith("wormhole"))
    assert wh.split() == ["wormhole", "1.00", "[1]", "n/a", ">=0.95", "-", "-", "n/a", "[2]", "-"]
    assert lines[-2:] == ["[1] wormhole throughput: iperf3 exited with 1: x",
                          "[2] wormhole tunnel-create: tunnel-delete failed: busy"]


def test_tunnel_json():
    doc = json.loads(json.dumps(tunnel_to_json(_tunnel_rows())))
    assert doc["goal_ratio"] == tunnel.GOAL and doc["ratio"] == pytest.approx(0.97)
    wh = {r["name"]: r for r in doc["rows"]}["wormhole"]
    assert wh["throughput_bps"] == pytest.approx(0.97e9)
    assert wh["throughput_samples_bps"] == [0.96e9, 0.98e9]
    assert wh["tunnel_create_s"] == 0.4 and wh["tunnel_create_first_s"] == 0.9


def test_json_carries_the_tunnel_table():
    doc = json.loads(rows_to_json(ROWS, {"nproc": 2}, tunnel_to_json(_tunnel_rows())))
    assert doc["tunnel"]["ratio"] == pytest.approx(0.97)
    assert "tunnel" not in json.loads(rows_to_json(ROWS, {"nproc": 2}))


def test_tunnel_table_lists_notes_without_a_cell():
    rows = _tunnel_rows()
    rows[1].notes["backend"] = "wormhole's tunnel runs on kernel"
    assert format_tunnel_table(rows).splitlines()[-1] == "[1] wormhole backend: wormhole's tunnel runs on kernel"


def test_tunnel_throughput_is_the_median_of_the_runs():
    row = TunnelRow("wormhole", samples=[0.2e9, 0.9e9, 0.25e9, 0.22e9])  # one run alone on the CPUs
    assert row.bps == pytest.approx(0.235e9)
    assert TunnelRow("hand-built").bps is None


# -- backends and the kernel-lab tables (bench/lab.py) ----------------------------------

from tunnel import BACKENDS, HandBuiltIpsec, parse_xfrm_states, xfrm_bytes  # noqa: E402

# `ip -s xfrm state list` (iproute2 6.1) of a host with an ESP tunnel: its two SAs, shortened keys
XFRM_STATES = """\
src 198.18.0.2 dst 198.18.0.1
\tproto esp spi 0x9c0ffee1(2618293985) reqid 16962(0x00004242) mode tunnel
\treplay-window 32 seq 0x00000000 flag  (0x00000000)
\taead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 (160 bits) 128
\tanti-replay context: seq 0x2a1, oseq 0x0, bitmap 0xffffffff
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  44120(bytes), 673(packets)
\t  add 2026-11-21 14:00:00 use 2026-11-21 14:00:01
\tstats:
\t  replay-window 0 replay 0 failed 0
src 198.18.0.1 dst 198.18.0.2
\tproto esp spi 0x00012345(74565) reqid 16962(0x00004242) mode tunnel
\treplay-window 32 seq 0x00000000 flag  (0x00000000)
\taead rfc4106(gcm(aes)) 0x1112131415161718191a1b1c1d1e1f2021222324 (160 bits) 128
\tanti-replay context: seq 0x0, oseq 0x8f1, bitmap 0x00000000
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  3254337(bytes), 2289(packets)
\t  add 2026-11-21 14:00:00 use 2026-11-21 14:00:01
\tstats:
\t  replay-window 0 replay 0 failed 0
"""


def test_xfrm_states():
    states = parse_xfrm_states(XFRM_STATES)
    assert [(s["src"], s["dst"], s["spi"], s["reqid"], s["bytes"], s["packets"]) for s in states] == [
        ("198.18.0.2", "198.18.0.1", 0x9C0FFEE1, 0x4242, 44120, 673),
        ("198.18.0.1", "198.18.0.2", 0x12345, 0x4242, 3254337, 2289),
    ]
    assert parse_xfrm_states("") == []


def test_xfrm_bytes_of_one_sa():
    assert xfrm_bytes(XFRM_STATES, "198.18.0.1", "198.18.0.2", 0x12345) == 3254337
    with pytest.raises(BenchError, match="no ESP state 198.18.0.2 -> 198.18.0.1 spi 0x00012345"):
        xfrm_bytes(XFRM_STATES, "198.18.0.2", "198.18.0.1", 0x12345)
    with pytest.raises(BenchError, match="no ESP state"):
        xfrm_bytes("", "198.18.0.1", "198.18.0.2", 0x12345)


def test_xfrm_states_unreadable():
    without_stats = "src 198.18.0.1 dst 198.18.0.2\n\tproto esp spi 0x00012345 reqid 16962 mode tunnel\n"
    with pytest.raises(BenchError, match="no counters"):
        parse_xfrm_states(without_stats)
    with pytest.raises(BenchError, match="cannot read"):
        parse_xfrm_states("Error: Requested type not found.\n")


def test_backends():
    assert tunnel.TOOLS == ("ip", "ss", "iperf3", "wireguard-go", "wg")  # the host table's
    assert "wireguard-go" not in BACKENDS["kernel-wireguard"].tools
    assert BACKENDS["ipsec"].create_args == ("--type", "ipsec") and not BACKENDS["ipsec"].wireguard
    assert [b.wormhole_backend for b in BACKENDS.values()] == ["wireguard-go", "kernel", "xfrm"]


def test_tunnel_header_per_backend():
    assert tunnel.tunnel_header(5, 1500).startswith("tunnel: WireGuard between two namespaces joined by a "
                                                     "veth pair (MTU 1500)")
    assert "median of 4 runs of 5 s per tunnel (order A B B A A B B A" in tunnel.tunnel_header(5, 1500)
    kernel = tunnel.tunnel_header(5, 1500, "kernel-wireguard", 2)
    assert kernel.startswith("tunnel: kernel WireGuard between")
    assert "median of 2 runs of 5 s per tunnel (order A B B A," in kernel
    assert tunnel.tunnel_header(5, None, "ipsec", 2).startswith(
        "tunnel: ipsec (ESP tunnel mode, xfrm, rfc4106(gcm(aes)) AES-128) between")
    assert tunnel_to_json(_tunnel_rows(), "ipsec")["backend"] == "ipsec"
    assert tunnel_to_json(_tunnel_rows())["backend"] == "wireguard-go"


def test_hand_built_ipsec_uses_wormholes_transform():
    """The hand-built ESP tunnel must be what wormhole builds (wormholed/tunnels/xfrm.py), or the
    ratio compares algorithms."""
    from wormholed.tunnels import ipsec, xfrm
    assert tunnel.ESP_AEAD == xfrm.AEAD_GCM_AES
    assert tunnel.ESP_KEY_BYTES == xfrm.AEAD_GCM_KEY_LEN == len(ipsec.new_key())
    assert tunnel.ESP_ICV_BITS == xfrm.AEAD_GCM_ICV_BITS
    assert tunnel.ESP_REPLAY_WINDOW == xfrm.REPLAY_WINDOW_MAX
    assert not ipsec.ours(tunnel.HAND_REQID), "wormholed would remove it as a stray"


class _FakeBed:
    ns = ("whbench1a", "whbench1b")
    veth = ("whb1a", "whb1b")


def test_hand_built_ipsec_commands(monkeypatch, tmp_path):
    made, undone = [], []
    monkeypatch.setattr(tunnel, "_check", lambda argv, *a, **k: made.append([str(x) for x in argv]) or "")
    monkeypatch.setattr(tunnel, "_run", lambda argv, *a, **k: undone.append([str(x) for x in argv]))
    with HandBuiltIpsec(_FakeBed(), tmp_path) as t:
        assert (t.remote_ip, t.iface, t.wg_pids()) == ("198.19.0.2", None, [])
    host = {ns: [c[3:] for c in made if c[2] == ns] for ns in _FakeBed.ns}
    states = {ns: [c for c in cmds if c[:3] == ["xfrm", "state", "add"]] for ns, cmds in host.items()}
    # Each host: the SA it sends with and the one it receives with; the same two SAs on both hosts
    sas = [sorted(" ".join(c[3:]) for c in states[ns]) for ns in _FakeBed.ns]
    assert len(sas[0]) == 2 and sas[0] == sas[1]
    for sa in states["whbench1a"]:
        assert sa[3:7] in (["src", "198.18.0.1", "dst", "198.18.0.2"], ["src", "198.18.0.2", "dst", "198.18.0.1"])
        assert sa[7:9] == ["proto", "esp"] and 0x100 <= int(sa[10], 16) < 2**32
        assert sa[11:] == ["reqid", str(0x4242), "mode", "tunnel", "replay-window", "32",
                           "aead", "rfc4106(gcm(aes))", sa[19], "128"]
        assert len(bytes.fromhex(sa[19][2:])) == 20
    assert states["whbench1a"][0][10] != states["whbench1a"][1][10], "two SPIs"
    assert [c for c in host["whbench1a"] if c[:3] == ["xfrm", "policy", "add"]] == [
        ["xfrm", "policy", "add", "src", a, "dst", b, "dir", d, "tmpl", "src", ts, "dst", td,
         "proto", "esp", "reqid", str(0x4242), "mode", "tunnel"]
        for a, b, d, ts, td in (("198.19.0.1/32", "198.19.0.2/32", "out", "198.18.0.1", "198.18.0.2"),
                                ("198.19.0.2/32", "198.19.0.1/32", "in", "198.18.0.2", "198.18.0.1"),
                                ("198.19.0.2/32", "198.19.0.1/32", "fwd", "198.18.0.2", "198.18.0.1"))]
    assert ["addr", "add", "198.19.0.2/32", "dev", "lo"] in host["whbench1b"]
    assert ["route", "add", "198.19.0.2/32", "dev", "whb1a", "src", "198.19.0.1"] in host["whbench1a"]
    # Everything made is removed on exit, the last made first
    assert len(undone) == len(made) == 2 * (2 + 3 + 2)
    assert undone[0][3:] == ["route", "del", "198.19.0.1/32"] and undone[-1][3:6] == ["xfrm", "state", "delete"]


def test_hand_built_ipsec_removes_what_it_made_when_a_step_fails(monkeypatch, tmp_path):
    made, undone = [], []

    def check(argv, *a, **k):
        if "policy" in argv:
            raise BenchError("ip xfrm policy add failed")
        made.append(argv)
        return ""
    monkeypatch.setattr(tunnel, "_check", check)
    monkeypatch.setattr(tunnel, "_run", lambda argv, *a, **k: undone.append([str(x) for x in argv]))
    with pytest.raises(BenchError, match="policy"):
        HandBuiltIpsec(_FakeBed(), tmp_path).__enter__()
    assert len(made) == 2 and [c[3:5] for c in undone] == [["xfrm", "state"]] * 2


def test_lab_only():
    import lab
    assert lab.parse_only(None) == ["kernel-wireguard", "ipsec"]
    assert lab.parse_only("ipsec,kernel-wireguard") == ["kernel-wireguard", "ipsec"]
    assert lab.parse_only("ipsec") == ["ipsec"]
    with pytest.raises(ValueError, match="wireguard-go"):
        lab.parse_only("wireguard-go")


def test_tunnel_table_in_mbits_for_the_lab():
    rows = [TunnelRow("hand-built", samples=[40.3e6], mtu=1420),
            TunnelRow("wormhole", samples=[38.9e6], mtu=1420, create_s=[5.2])]
    lines = format_tunnel_table(rows, unit="Mbit/s").splitlines()
    assert lines[0].split()[:3] == ["tunnel", "throughput", "Mbit/s"]
    assert lines[3].split()[:3] == ["wormhole", "38.90", "0.97"]
    assert len({len(l) for l in lines[:4]}) == 1, "columns align"


def test_lab_header_says_tcg_figures_are_for_ratios():
    import datetime
    import lab
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    assert "without KVM (TCG): figures are for ratios only" in lab.lab_header(when, 5, "qemu")
    assert "virt kvm" in lab.lab_header(when, 5, "kvm") and "TCG" not in lab.lab_header(when, 5, "kvm")


# -- handover ------------------------------------------------------------------------

def test_echo_gaps_and_their_statistics():
    arrivals = [10.000, 10.001, 10.002, 10.300, 10.300, 10.301]
    assert run.echo_gaps(arrivals) == pytest.approx([1, 1, 298, 0, 1])
    g = run.gap_stats(arrivals)
    assert (g.max_ms, g.echoes) == (pytest.approx(298), 6)
    assert g.p99_ms == pytest.approx(298)  # nearest rank of 5 gaps: the largest
    steady = [i * 0.001 for i in range(1001)] + [1.5]  # 1000 gaps of 1 ms, then one of 500
    g = run.gap_stats(steady)
    assert g.max_ms == pytest.approx(500) and g.p99_ms == pytest.approx(1)
    assert run.gap_stats([]) is None and run.gap_stats([1.0]) is None


def test_split_gaps_gives_the_gap_across_the_mark_to_the_takeovers():
    arrivals = [0.0, 0.001, 0.002, 0.2, 0.201]
    base, during = run.split_gaps(arrivals, 0.1)
    assert base.max_ms == pytest.approx(1) and base.echoes == 3
    assert during.max_ms == pytest.approx(198) and during.echoes == 3
    assert run.split_gaps(arrivals, None)[1] is None
    assert run.split_gaps(arrivals, None)[0].max_ms == pytest.approx(198)


def test_pauses_per_takeover_window():
    def takeover(started, seconds):
        return run.Takeover(seconds=seconds, exit_s=seconds, old_log_s=None, fds=None, started=started)
    takeovers = [takeover(1.0, 0.5), takeover(3.0, 0.5), takeover(3.6, 0.2)]
    windows = run.pause_windows(takeovers, slack=1.0)
    assert windows == [(1.0, 2.5), (3.0, 3.6), (3.6, pytest.approx(4.8))]
    arrivals = [0.5, 0.9, 1.05, 1.09, 1.1, 2.0, 2.9, 3.0, 3.05, 3.07, 5.0]
    got = run.pauses(arrivals, windows)
    # 1.09 -> 1.1 ms gaps and 1.1 -> 2.0 (900 ms) end in the first window; 2.9 -> 3.0 ends
    # at 3.0, inside the second; nothing ends in the third (5.0 is past it)
    assert got[0] == pytest.approx(900) and got[1] == pytest.approx(100) and got[2] is None
    assert run.pauses([], windows) == [None, None, None]
    assert run.pauses([1.0, 1.2], [(0.0, 2.0)]) == [pytest.approx(200)]  # the first echo ends no gap


@pytest.mark.parametrize("seqs, sent, expected", [
    ([0, 1, 2, 3], 4, (0, 0)),
    ([0, 1, 3], 4, (1, 0)),  # 2 lost: a jump alone is not disorder
    ([0, 2, 1, 3], 4, (0, 1)),  # 1 overtaken by 2
    ([0, 1, 1, 2, 3], 4, (0, 1)),  # a duplicate
    ([0, 1, 2, 9], 4, (1, 1)),  # never sent, and 3 lost
    ([], 3, (3, 0)),
])
def test_sequence_faults(seqs, sent, expected):
    assert run.sequence_faults(seqs, sent) == expected


def test_handover_log_times_the_old_daemons_lines():
    lines = [(1.0, "wormholed: INFO listening on unix:///x"),
             (5.000, "wormholed: INFO handover: pid 77 takes over; stopping to hand over"),
             (5.012, "wormholed: INFO handover: pid 77 took over 10003 fds; exiting")]
    seconds, fds = run.handover_log(lines)
    assert seconds == pytest.approx(0.012) and fds == 10003
    assert run.handover_log(lines[:2]) == (None, None)
    assert run.handover_log([lines[2]]) == (None, 10003)


def handover_result():
    def takeover(seconds, exit_s, log_s, fds):
        return run.Takeover(seconds, exit_s, log_s, fds, started=0.0)
    gaps = run.GapStats
    pauses = [run.PauseRun("wormhole", gaps(1.6, 1.1, 3000), gaps(61.4, 1.2, 13000), [61, 39, 34, 41, 44],
                           16505, 16505, 0, 0, 70.0),
              run.PauseRun("wormhole-python", error="wormholed exited with 1: boom")]
    counts = [run.HandoverCount(1, 1, [takeover(0.52, 0.49, 0.0028, 5)] * 3, [30, 31, 32], 1),
              run.HandoverCount(5000, 3290, [takeover(1.06, 0.93, 0.2154, 10003), takeover(1.2, 1.0, 0.3, 10003)],
                                [200, 250], 3290, note="3290 connections, not 5000: 6 fds each")]
    stream = run.PauseRun("native engine, timed", during=gaps(250.0, 1.3, 9000), sent=9100, echoed=9100, lost=0,
                          out_of_order=0)
    return run.HandoverResult(pauses, "native", counts, runs=3, stream=stream)


def test_handover_table():
    text = run.handover_table(handover_result())
    lines = text.splitlines()
    assert "every 1 ms" in text and "then 5 takeovers 2 s apart" in text
    row = next(line for line in lines if line.startswith("wormhole "))
    assert row.split() == ["wormhole", "1.6", "1.1", "61.4", "1.2", "16505", "0", "0", "61", "39", "34", "41", "44"]
    assert "wormhole-python  n/a (wormholed exited with 1: boom)" in lines
    one = next(line for line in lines if line.split()[:1] == ["1"])
    assert one.split() == ["1", "520", "520", "490", "2.8", "31", "32", "5", "1/1"]
    many = next(line for line in lines if line.split()[:1] == ["5000"])
    assert many.split() == ["5000", "1130", "1200", "965", "257.7", "225", "250", "10003", "3290/3290", "[1]"]
    assert "[1] 3290 connections, not 5000: 6 fds each" in lines
    assert "the stream: 9100 messages sent, 0 lost, 0 out of order; its longest gap 250 ms" in lines
    # every row lines up under its heads
    heads = next(line for line in lines if line.startswith("engine"))
    assert heads.index("sent") + len("sent") == row.index("16505") + len("16505")


def test_handover_table_without_echo_server():
    h = run.HandoverResult([], "native", [], error="echo-server exited with 1")
    assert run.handover_table(h).endswith("n/a (echo-server exited with 1)")


def test_handover_json():
    doc = json.loads(json.dumps(run.handover_to_json(handover_result())))
    assert doc["interval_ms"] == 1 and doc["takeovers"] == 5 and doc["engine"] == "native"
    w, py = doc["pause"]
    assert (w["gap_max_ms"], w["baseline_gap_p99_ms"], w["lost"], w["pauses_ms"][0]) == (61.4, 1.1, 0, 61)
    assert py["error"].startswith("wormholed exited") and py["gap_max_ms"] is None
    one, many = doc["times"]
    assert one["takeover_p50_s"] == 0.52 and one["old_log_s"] == [0.0028] * 3 and one["echoed_after"] == 1
    assert (many["connections_asked"], many["connections"]) == (5000, 3290)
    assert many["note"] == "3290 connections, not 5000: 6 fds each"
    assert doc["times_stream"]["sent"] == 9100


def test_side_by_side_ratios_and_the_quiet_median():
    import sidebyside as sbs

    def pair(w, ws, h, hs):
        return sbs.Pair({"wormhole": sbs.Run(w, ws), "haproxy": sbs.Run(h, hs)})

    result = sbs.SideBySide([pair(30000, 1.0, 25000, 2.0), pair(9000, 40.0, 18000, 10.0),
                             pair(22000, 3.0, 20000, 6.0)])
    assert [round(p.ratio, 2) for p in result.pairs] == [1.2, 0.5, 1.1]
    assert [p.quiet for p in result.pairs] == [True, False, False]
    assert round(result.median_ratio(), 2) == 1.1 and round(result.median_ratio(quiet_only=True), 2) == 1.2
    text = sbs.table(result, 4)
    assert "wormhole: median ratio 1.10 over all 3 rounds; 1.20 over the 1 where its and haproxy's steal" in text
    assert "floor" not in text
    assert sbs.to_json(result)["pairs"][1] == {"wormhole": {"rate": 9000, "steal": 40.0},
                                               "haproxy": {"rate": 18000, "steal": 10.0}}


def test_side_by_side_with_the_floor_relay():
    import sidebyside as sbs

    def triple(w, h, f, fs):
        return sbs.Pair({"wormhole": sbs.Run(w, 1.0), "haproxy": sbs.Run(h, 2.0), "floor": sbs.Run(f, fs)})

    result = sbs.SideBySide([triple(30000, 25000, 26000, 1.0), triple(20000, 20000, 24000, 9.0),
                             triple(22000, 20000, 21000, 3.0)])
    assert [p.ratio_of("floor") for p in result.pairs] == [1.04, 1.2, 1.05]
    assert [p.quiet_for("floor") for p in result.pairs] == [True, False, True]
    assert result.median_ratio(name="floor") == 1.05
    assert round(result.median_ratio(quiet_only=True, name="floor"), 3) == 1.045
    text = sbs.table(result, 4)
    assert "floor: median ratio 1.05 over all 3 rounds; 1.04 over the 2 where" in text  # 1.045 prints 1.04
    [second] = [line for line in text.splitlines() if line.startswith("2 ")]
    assert second.split()[-3:] == ["24000", "9.0", "1.20"]
    doc = sbs.to_json(result)
    assert doc["floor_median_ratio"] == 1.05 and doc["pairs"][0]["floor"] == {"rate": 26000, "steal": 1.0}


def test_side_by_side_runs_every_order_of_its_rows():
    import sidebyside as sbs

    rows = ["wormhole", "haproxy", "floor"]
    assert len({tuple(sbs.order_of(rows, i)) for i in range(6)}) == 6
    assert [sbs.order_of(rows[:2], i) for i in range(4)] == [rows[:2], rows[1::-1], rows[1::-1], rows[:2]]


def test_interleaved_runs_every_row_each_round_and_notes_failures():
    calls = []
    rows = [run.Row("a"), run.Row("b"), run.Row("c")]

    def once(name, fail_at=()):
        def call():
            calls.append(name)
            if len([c for c in calls if c == name]) in fail_at:
                raise run.BenchError(f"{name} broke")
        return call

    run.interleaved(rows, "throughput", 4, {"a": once("a"), "b": once("b", fail_at=(2,)), "c": once("c", (1, 2, 3, 4))})
    assert calls[:3] == ["a", "b", "c"] and calls[3:6] == ["c", "b", "a"]  # round 1 reversed
    assert sorted(calls) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert "throughput" not in rows[0].notes
    assert rows[1].notes["throughput"] == "1 of 4 runs failed: b broke"
    assert rows[2].notes["throughput"] == "c broke"  # every run failed: the error alone
