"""Unit tests for bench/run.py's pure functions: .venv/bin/python -m pytest bench/test_parse.py"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    BenchError, Row, format_table, parse_create_output, parse_iperf3, parse_only,
    parse_wrk, rows_to_json,
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
    assert parse_only(None) == ["direct", "wormhole", "systemd-socket-proxyd", "haproxy", "socat"]


def test_only_keeps_direct_and_table_order():
    assert parse_only("socat,wormhole") == ["direct", "wormhole", "socat"]
    assert parse_only("haproxy socat") == ["direct", "haproxy", "socat"]


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
    lines = format_table(ROWS).splitlines()
    direct = next(l for l in lines if l.startswith("direct"))
    socat = next(l for l in lines if l.startswith("socat"))
    assert direct.split() == ["direct", "20.00", "1.00", "14000", "1.00", "-", "-"]
    assert socat.split() == ["socat", "5.00", "0.25", "1750", "0.12", "-", "-"]


def test_table_unavailable_row_and_footnotes():
    text = format_table(ROWS, header="HEADER")
    lines = text.splitlines()
    assert lines[0] == "HEADER"
    assert "wormhole" in text and "n/a (wormholed did not answer ping within 10 s)" in text
    haproxy = next(l for l in lines if l.startswith("haproxy"))
    assert haproxy.split() == ["haproxy", "10.00", "0.50", "n/a", "[1]", "n/a", "-", "-"]
    assert lines[-1] == "[1] haproxy conn/s: haproxy exited with 1"


def test_table_columns_align():
    lines = [l for l in format_table(ROWS).splitlines() if l.startswith(("proxy", "direct", "socat"))]
    assert len({len(l) for l in lines}) == 1


def test_table_without_direct_has_no_ratios():
    line = format_table([Row("socat", bps=5e9, conn_per_s=1750.0)]).splitlines()[-1]
    assert line.split() == ["socat", "5.00", "n/a", "1750", "n/a", "-", "-"]


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


def test_table_shows_proxy_cpu():
    from run import Row
    rows = [Row("direct", bps=2e10, conn_per_s=14000),
            Row("wormhole", bps=1e10, conn_per_s=7000, cpu_s_per_gb=0.3, cpu_us_per_conn=155.4)]
    line = next(l for l in format_table(rows).splitlines() if l.startswith("wormhole"))
    assert line.split() == ["wormhole", "10.00", "0.50", "7000", "0.50", "0.300", "155"]
