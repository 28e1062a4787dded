"""The CLI as people use it, against a real daemon: shell completion of the ids `delete` takes,
`list --watch` redrawing until Ctrl-C, and a command that imports no asyncio (what keeps it
quick to start; how quick is bench/run.py's business, not a test's)."""

import os
import signal
import subprocess
import sys
import threading
import time

from harness import SLOW, WORMHOLE


def complete(host, *words: str) -> list[str]:
    """What the real `wormhole WORDS<TAB>` offers in bash on host (the last word is being typed)."""
    env = {**os.environ, "_WORMHOLE_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["wormhole", *words]),
           "COMP_CWORD": str(len(words))}
    r = host.exec(WORMHOLE, env=env, timeout=30)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [line.partition(",")[2] for line in r.stdout.splitlines() if line]


def test_delete_completes_the_daemons_ids(host):
    ident, _ = host.create("url", ":7101", "tail", "url", ":7102", "id", "fast-cli")
    other, _ = host.create("url", ":7103", "tail", "url", ":7104")
    assert ident == "fast-cli"
    assert complete(host, "-H", host.sock, "delete", "fast") == ["fast-cli"]
    assert sorted(complete(host, "-H", host.sock, "delete", "")) == sorted([ident, other])
    assert complete(host, "-H", host.sock, "delete", "nothing-like-it") == []
    host.ok("delete", "fast-cli")
    assert complete(host, "-H", host.sock, "delete", "") == [other]


def test_bash_completes_ids_after_an_address_it_split(host):
    """bash splits `-H unix:///...` at ':'; its function passes the line as typed too."""
    ident, _ = host.create("url", ":7105", "tail", "url", ":7106", "id", "split-by-bash")
    line = f"wormhole -H {host.sock} delete spl"
    words = ["wormhole", "-H", "unix", ":", host.sock.removeprefix("unix:"), "delete", "spl"]
    script = ('eval "$(_WORMHOLE_COMPLETE=bash_source "$0")"; COMP_LINE="$1"; COMP_POINT=${#1}; shift; '
              'COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _wormhole_completion "$0"; '
              'echo "${COMPREPLY[@]}"')
    r = host.exec("bash", "--norc", "-c", script, WORMHOLE, line, *words, timeout=30)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.split() == [ident], r


def _ctrl_c_reaches_it() -> None:
    """A job a shell starts in the background inherits SIGINT ignored, and Python leaves an
    ignored SIGINT ignored: the CLI under test gets the default, as at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_list_watch_redraws_and_ctrl_c_exits_0(host):
    ident, _ = host.create("url", ":7111", "tail", "url", ":7112")
    proc = host.popen(WORMHOLE, "-H", host.sock, "list", "--watch", "--interval", "0.2",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_reaches_it)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30 * SLOW
        while sum(ident in line for line in lines) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        tables = [i for i, line in enumerate(lines) if line.startswith("ID ")]
        assert len(tables) >= 3, f"{len(tables)} tables:\n{''.join(lines)}"
        assert "CONN/S" in lines[tables[0]] and "BYTES/S IN/OUT" in lines[tables[0]]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(10 * SLOW)
        finally:
            proc.kill()
            reader.join(10)
    assert rc == 0, proc.stderr.read()
    assert proc.stderr.read() == ""


def test_a_command_imports_no_asyncio(host):
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import wormhole.cli"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "wormhole.cli" in r.stderr
    assert "asyncio" not in r.stderr
    r = host.exec(sys.executable, "-X", "importtime", WORMHOLE, "-H", host.sock, "list", timeout=30)
    assert r.returncode == 0 and "wormhole.client" in r.stderr, r.stderr
    assert "asyncio" not in r.stderr


def test_list_and_ping_answer_without_click_and_print_what_click_prints(host, tmp_path):
    """`list` and `ping` in their plain forms take the fast path (wormhole/fast.py); what
    they print is what the click command prints, and anything else goes to click."""
    host.echo_server(7401)
    host.create("id", "fast", "url", ":8401", "tail", "url", ":7401")
    via_click = [sys.executable, "-c", "import sys; from wormhole.cli import main; sys.argv[0] = 'wormhole'; main()"]
    for args in (["list"], ["list", "--json"]):
        fast = host.exec(sys.executable, "-X", "importtime", WORMHOLE, "-H", host.sock, *args, timeout=30)
        assert fast.returncode == 0 and "click" not in fast.stderr.replace("wormhole.cli", "")
        slow = host.exec(*via_click, "-H", host.sock, *args, timeout=30)
        assert fast.stdout == slow.stdout and "fast" in fast.stdout
    r = host.exec(WORMHOLE, f"--host={host.sock}", "ping", timeout=30)
    assert r.returncode == 0 and float(r.stdout) > 0
    r = host.exec(WORMHOLE, "-H", host.sock, "-K", str(tmp_path / "missing"), "list", timeout=30)
    assert r.returncode == 1 and r.stderr.startswith("wormhole: error: key file") and r.stdout == ""
    r = host.exec(WORMHOLE, "-H", "bad host!", "list", timeout=30)  # not the fast path's: click says why
    assert r.returncode == 2 and "bad host" in r.stderr
    r = host.exec(WORMHOLE, "-H", host.sock, "list", "--bogus", timeout=30)
    assert r.returncode == 2 and "--bogus" in r.stderr
