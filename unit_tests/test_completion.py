"""Shell completion without a daemon: create's words (from the grammar, spec.ARITY), command
names, silence when the daemon that would give ids does not answer, and bash's words split
at ':' (the line as typed is what counts)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wormhole.completion import bash_args, create_candidates
from wormhole.spec import ARITY

WORMHOLE = str(Path(sys.executable).parent / "wormhole")


def complete(*words: str, env: dict | None = None) -> list[str]:
    """What `wormhole WORDS<TAB>` offers in bash (the last word is the one being typed)."""
    r = subprocess.run([WORMHOLE], capture_output=True, text=True, timeout=30,
                       env={**os.environ, **(env or {}), "_WORMHOLE_COMPLETE": "bash_complete",
                            "COMP_WORDS": " ".join(["wormhole", *words]), "COMP_CWORD": str(len(words))})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line.partition(",")[2] for line in r.stdout.splitlines() if line]


def test_every_word_of_the_grammar_is_offered():
    assert create_candidates((), "") == list(ARITY)
    assert create_candidates(("url", ":80"), "") == list(ARITY)


@pytest.mark.parametrize("words,incomplete,expect", [
    ((), "t", ["tail", "trigger", "tunnel"]),
    (("url", ":80"), "tr", ["trigger"]),
    (("url", ":80", "tail"), "u", ["url", "udptunnel"]),
    (("url",), "", []),                           # a URL goes here
    (("url", ":80", "remote"), "my", []),         # a host goes here
    (("url", ":80", "max-conns"), "", []),
    (("url", ":80", "child", "url"), "", []),
    (("url", ":80", "child", "url", ":81"), "id", ["id", "idle-timeout"]),
    (("frob",), "ta", ["tail"]),                   # an unknown word takes no argument
])
def test_create_candidates(words, incomplete, expect):
    assert create_candidates(words, incomplete) == expect


def test_words_after_an_argument_taking_word_are_its_argument():
    for word, arity in ARITY.items():
        assert (create_candidates((word,), "") == []) == (arity == 1), word


def test_the_shell_gets_commands_and_create_words():
    assert complete("tunnel-") == ["tunnel-create", "tunnel-delete", "tunnel-list"]
    assert complete("create", "url", ":80", "tr") == ["trigger"]
    assert complete("help", "key") == ["keygen"]
    assert "--watch" in complete("list", "--")


def test_no_daemon_no_ids_and_no_error(tmp_path):
    key = tmp_path / "key"
    key.write_text("k")
    key.chmod(0o600)
    assert complete("-H", f"unix://{tmp_path}/none.sock", "-K", str(key), "delete", "") == []
    assert complete("-K", str(tmp_path / "nokey"), "delete", "") == []
    assert complete("-H", "http://bad", "delete", "") == []


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_shells_get_a_script(shell):
    r = subprocess.run([WORMHOLE], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "_WORMHOLE_COMPLETE": f"{shell}_source"})
    assert r.returncode == 0 and "_WORMHOLE_COMPLETE" in r.stdout and "wormhole" in r.stdout
    assert ("COMP_LINE" in r.stdout) == (shell == "bash"), "bash's script passes the line as typed"


@pytest.mark.parametrize("line,current,expect", [
    ("wormhole ", "", ([], "", "")),
    ("wormhole -H :6666 delete ", "", (["-H", ":6666", "delete"], "", "")),
    ("wormhole -H :6666 delete db", "db", (["-H", ":6666", "delete"], "db", "")),
    ("wormhole delete db:", ":", (["delete"], "db:", "db")),       # bash replaces only ':'
    ("wormhole delete db:1", "1", (["delete"], "db:1", "db:")),
    ("wormhole create url unix:///a", "///a", (["create", "url"], "unix:///a", "unix:")),
    ("wormhole create docker-run '-e A=1 im", "'-e A=1 im", (["create", "docker-run"], "-e A=1 im", "")),
])
def test_bash_args_come_from_the_line_as_typed(line, current, expect):
    assert bash_args(line, current) == expect


def bash_complete(line: str, *words: str) -> list[str]:
    """What the bash function offers for LINE, given bash's words for it (split at ':')."""
    bin_dir = str(Path(WORMHOLE).parent)
    script = ('eval "$(_WORMHOLE_COMPLETE=bash_source wormhole)"; COMP_LINE="$1"; COMP_POINT=${#1}; shift; '
              'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _wormhole_completion wormhole; '
              'printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "--norc", "-c", script, "bash", line, *words], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.skipif(not shutil.which("bash"), reason="no bash")
def test_bash_completes_after_words_it_split_at_colons():
    assert bash_complete("wormhole create url :80 tr", "wormhole", "create", "url", ":", "80", "tr") == ["trigger"]
    assert bash_complete("wormhole -H :6666 help tunnel-l", "wormhole", "-H", ":", "6666", "help",
                         "tunnel-l") == ["tunnel-list"]
    assert bash_complete("wormhole create url udp://dns@:53 ", "wormhole", "create", "url", "udp", ":", "//dns@",
                         ":", "53", "") == create_candidates((), "")
