"""The CLI without a daemon: help, keygen, and the errors it gives itself (one line, exit 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

WORMHOLE = str(Path(sys.executable).parent / "wormhole")


def run(*args, **kw):
    return subprocess.run([WORMHOLE, *args], capture_output=True, text=True, timeout=30, **kw)


def test_help_teaches_the_grammar():
    r = run("help", "create")
    assert r.returncode == 0
    for word in ("url URL", "docker-run", "trigger", "chain", "remote HOST", "Examples:"):
        assert word in r.stdout
    assert run("help").stdout == run("--help").stdout
    r = run("help", "nope")
    assert r.returncode == 2 and "no command 'nope'" in r.stderr


def test_keygen_prints_a_fresh_key():
    a, b = run("keygen").stdout.strip(), run("keygen").stdout.strip()
    assert a != b and len(a) == 40


@pytest.mark.parametrize("args,msg", [
    (("create", "url", ":80"), "proxies to itself"),
    (("create", "frob"), "unknown word 'frob'"),
    (("create",), "nothing to create"),
    (("create", "url", ":80", "tail", "docker-run", "--privileged img"), "unknown option"),
    (("-H", "http://x", "ping"), "tcp:// or unix://"),
    (("frobnicate",), "No such command"),
    (("delete",), "Missing argument"),
])
def test_usage_errors_are_one_line_exit_2(args, msg):
    r = run(*args)
    assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_missing_key_is_one_line_exit_1(tmp_path):
    r = run("-K", str(tmp_path / "none"), "ping")
    assert r.returncode == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1


def test_words_that_look_like_options_are_words():
    """A quoted docker-run word such as '-p 80:80 wormhole/x' is not click's -h."""
    r = run("create", "url", ":80", "tail", "docker-run", "-p 80:80 wormhole/wordpress")
    assert r.returncode == 2 and "unknown option '-p'" in r.stderr
    assert run("create", "--help").returncode == 0
