"""The CLI without a daemon: help, keygen, the errors it gives itself (one line, exit 2), what
it imports, and the pure parts of `list --watch` (rates and their table)."""

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wormhole import addr, spec
from wormhole.cli import cli
from wormhole.tables import human_rate, list_rates, list_table

WORMHOLE = str(Path(sys.executable).parent / "wormhole")


def run(*args, **kw):
    return subprocess.run([WORMHOLE, *args], capture_output=True, text=True, timeout=30, **kw)


def test_help_teaches_the_grammar():
    r = run("help", "create")
    assert r.returncode == 0
    for word in ("url URL", "docker-run", "trigger", "chain", "remote HOST", "Examples:"):
        assert word in r.stdout
    assert f"Limits: {spec.MAX_WORDS} words, {spec.MAX_WORD_LENGTH} characters" in r.stdout
    assert run("help").stdout == run("--help").stdout
    r = run("help", "nope")
    assert r.returncode == 2 and "no command 'nope'" in r.stderr


@pytest.mark.parametrize("command", [None, *cli.commands])
def test_every_help_has_an_example(command):
    r = run(*([command, "--help"] if command else ["--help"]))
    assert r.returncode == 0, r.stderr
    examples = r.stdout.partition("Examples:")[2]
    assert f"wormhole {command or ''}".strip() in examples, r.stdout


def test_keygen_prints_a_fresh_key():
    a, b = run("keygen").stdout.strip(), run("keygen").stdout.strip()
    assert a != b and len(a) == 40 and a.isalnum()


@pytest.mark.parametrize("args,msg", [
    (("create", "url", ":80"), "proxies to itself"),
    (("create", "frob"), "unknown word 'frob'"),
    (("create",), "nothing to create"),
    (("create", "url", ":80", "tail", "docker-run", "--privileged img"), "unknown option"),
    (("-H", "http://x", "ping"), "tcp:// or unix://"),
    (("-H", "127.0.0.1:0", "ping"), "ports are 1-65535"),
    (("frobnicate",), "No such command"),
    (("delete",), "Missing argument"),
    (("list", "--watch", "--json"), "does not go with --json"),
    (("list", "--watch", "--interval", "0"), "0.1"),
])
def test_usage_errors_are_one_line_exit_2(args, msg):
    r = run(*args)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_missing_key_is_one_line_exit_1(tmp_path):
    r = run("-K", str(tmp_path / "none"), "ping")
    assert r.returncode == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1


def test_no_daemon_is_one_line_exit_1(tmp_path):
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o600)
    r = run("-H", f"unix://{tmp_path}/none.sock", "-K", str(key), "list")
    assert r.returncode == 1 and "cannot reach wormholed" in r.stderr and r.stderr.count("\n") == 1


def test_words_that_look_like_options_are_words():
    """A quoted docker-run word such as '-p 80:80 wormhole/x' is not click's -h."""
    r = run("create", "url", ":80", "tail", "docker-run", "-p 80:80 wormhole/wordpress")
    assert r.returncode == 2 and "unknown option '-p'" in r.stderr
    assert run("create", "--help").returncode == 0


# --- what a command imports -------------------------------------------------------------

HEAVY = ("asyncio", "wormhole.async_client", "wormhole.spec", "wormhole.client", "json", "secrets",
         "wormhole.docker_args", "ipaddress", "click.shell_completion")


def loaded_after(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [m for m in HEAVY if m in r.stdout.split()]


def test_the_cli_imports_only_what_every_command_needs():
    """The rest (the client, the create grammar, json, asyncio never) comes with the command."""
    assert loaded_after("import wormhole.cli") == []
    help_run = "import wormhole.cli\ntry:\n    wormhole.cli.cli.main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass"
    assert loaded_after(help_run) == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(alphabet="0123456789.:[]%af ²", max_size=22),
    st.builds(lambda ip, port: f"{ip}{port}", st.ip_addresses(v=4).map(str) | st.just(""),
              st.sampled_from(["", ":", ":0", ":1", ":080", ":65535", ":65536", ":99999", ":123456", ":²"]))))
def test_the_cli_address_fast_path_agrees_with_the_grammar(text):
    """addr reads IPv4 literals and ports without spec; what it accepts, spec reads alike."""
    fast = addr._literal_host_port(text)
    if fast is not None:
        assert fast == spec.split_host_port(text, "address")


# --- list --watch: rates --------------------------------------------------------------------


def row(ident, total=0, bytes_in=0, bytes_out=0, **kw):
    return {"id": ident, "head": "tcp://127.0.0.1:1", "tail": "tcp://127.0.0.1:2", "state": "active",
            "connections": 0, "total": total, "bytes_in": bytes_in, "bytes_out": bytes_out, "refused": 0, **kw}


def test_rates_are_per_second_between_two_lists():
    before = [row("a", 10, 1000, 50), row("gone", 5)]
    after = [row("a", 30, 5000, 50), row("new", 7)]
    assert list_rates(before, after, 2.0) == {"a": (10.0, 2000.0, 0.0)}


def test_counters_that_went_back_have_no_rate():
    """Deleted and made again under the same id, or the daemon restarted."""
    assert list_rates([row("a", 10, 1000, 1000)], [row("a", 2, 5000, 5000)], 1.0) == {}
    assert list_rates([row("a", 1)], [row("a", 2)], 0.0) == {}


@pytest.mark.parametrize("value,text", [
    (None, "-"), (0, "0"), (0.25, "0.2"), (0.5, "0.5"), (9.96, "10"), (12.4, "12"), (999, "999"),
    (1000, "1.0k"), (1234, "1.2k"), (56_789, "57k"), (3.4e6, "3.4M"), (5.6e9, "5.6G"), (1.2e12, "1200G"),
])
def test_human_rate(value, text):
    assert human_rate(value) == text


def test_the_watch_table_shows_rates_beside_totals():
    rows = [row("a", 30, 5000, 50, connections=2), row("new", 7)]
    table = list_table(rows, {"a": (10.0, 2000.0, 0.0)})
    header = table[0]
    assert header[4:9] == ("CONNS", "CONN/S", "REFUSED", "BYTES IN/OUT", "BYTES/S IN/OUT")
    assert table[1][4:9] == ("2/30", "10", "0", "5000/50", "2.0k/0")
    assert table[2][5] == "-" and table[2][8] == "-/-"
    assert list_table(rows)[0] == ("ID", "HEAD", "TAIL", "STATE", "CONNS", "REFUSED", "BYTES IN/OUT", "LIMITS",
                                   "CHILD")


def test_list_table_shows_each_of_several_tails():
    row = {"id": "lb", "head": "tcp://127.0.0.1:80", "tail": "tcp://127.0.0.1:81", "state": "active",
           "connections": 1, "total": 9, "refused": 0, "bytes_in": 5, "bytes_out": 6,
           "tails": [{"url": "tcp://127.0.0.1:81", "state": "up", "connections": 1, "total": 5, "failures": 0},
                     {"url": "unix:///run/b.sock", "state": "down", "connections": 0, "total": 4, "failures": 2}]}
    table = list_table([row])
    assert table[1][:5] == ("lb", "tcp://127.0.0.1:80", "2 tails:", "active", "1/9")
    assert table[2][2:5] == ("  tcp://127.0.0.1:81", "up", "1/5")
    assert table[3][2:5] == ("  unix:///run/b.sock", "down (2 failed)", "0/4")
    assert all(len(r) == len(table[0]) for r in table)
    assert len(list_table([row], {})[3]) == len(list_table([row], {})[0])
    single = dict(row, tails=[{"url": "tcp://127.0.0.1:81"}])
    assert [r[2] for r in list_table([single])] == ["TAIL", "tcp://127.0.0.1:81"]


def test_the_fast_path_reads_only_the_plain_forms_of_list_and_ping():
    from wormhole.fast import plain
    assert plain(["list"]) == ({}, "list", [])
    assert plain(["-H", ":1", "--key-file", "k", "list", "--json"]) == ({"host": ":1", "key": "k"}, "list", ["--json"])
    assert plain(["--host=unix:///s", "-K", "k", "ping"]) == ({"host": "unix:///s", "key": "k"}, "ping", [])
    for argv in ([], ["--help"], ["list", "--help"], ["list", "-w"], ["ping", "myserver"], ["create", "url", ":1"],
                 ["-H"], ["-H=x", "list"], ["-v", "list"], ["list", "--json", "--json"], ["help"]):
        assert plain(argv) is None, argv
