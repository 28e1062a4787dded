"""The `wormhole` command's entry point: `list` and `ping` without click.

People run `wormhole list` in loops and scripts, and click's import alone costs more than
the whole call to the daemon (a TLS-PSK handshake and one round trip on a blocking
socket). So the two commands run most often, in their plain forms, are read here from
argv and answered with the same modules and output as cli.py's:

    wormhole [-H ADDR] [-K KEYFILE] list [--json]
    wormhole [-H ADDR] [-K KEYFILE] ping

(options also as --host/--key-file, with `=` or not; WORMHOLE_HOST and WORMHOLE_KEY_FILE
apply). Anything else, including any form of help, shell completion, or an -H the fast
path does not read, goes to cli.py, which also gives every usage error. Errors are
printed as cli.py prints them: `wormhole: error: ...`, exit 1.
"""

from __future__ import annotations

import os
import sys

_OPTIONS = {"-H": "host", "--host": "host", "-K": "key", "--key-file": "key"}


def plain(argv: list[str]) -> tuple[dict, str, list[str]] | None:
    """({host, key}, command, its arguments) when argv is one of the plain forms; else None."""
    opts: dict = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name not in _OPTIONS or (eq and name in ("-H", "-K")):
            return None
        if not eq:
            if i + 1 >= len(argv):
                return None
            value = argv[i + 1]
            i += 1
        opts[_OPTIONS[name]] = value
        i += 1
    if i >= len(argv):
        return None
    command, rest = argv[i], argv[i + 1:]
    if (command, rest) in (("list", []), ("list", ["--json"]), ("ping", [])):
        return opts, command, rest
    return None


def _error(message) -> None:
    sys.stderr.write(f"wormhole: error: {message}\n")
    sys.exit(1)


def run(opts: dict, command: str, rest: list[str]) -> bool:
    """Answer the command; False when cli.py must (an address the fast path does not read)."""
    from .addr import Address, AddressError
    from .keys import DEFAULT_KEYFILE, KeyFileError, client_context, load_key

    try:
        addr = Address.parse(opts.get("host") or os.environ.get("WORMHOLE_HOST") or "127.0.0.1:9999",
                             default_host="127.0.0.1")
    except AddressError:
        return False  # cli.py says what is wrong with it, as a usage error
    from .client import call_once
    from .rpc import RpcError

    try:
        key = load_key(opts.get("key") or os.environ.get("WORMHOLE_KEY_FILE") or DEFAULT_KEYFILE)
        ctx = client_context(key, lean=True)
        if command == "ping":
            import time

            start = time.perf_counter()
            call_once(addr, key, "ping", ctx=ctx)
            sys.stdout.write(f"{(time.perf_counter() - start) * 1000:.3f}\n")
            return True
        rows = call_once(addr, key, "list", ctx=ctx)
    except (KeyFileError, RpcError) as e:
        _error(e)
    except KeyboardInterrupt:
        sys.exit(130)
    if rest == ["--json"]:
        from .client import dumps_indented

        sys.stdout.write(dumps_indented(rows) + "\n")
    else:
        from .tables import list_table, table_lines

        sys.stdout.write("".join(line + "\n" for line in table_lines(list_table(rows))))
    return True


def main() -> None:
    found = plain(sys.argv[1:]) if "_WORMHOLE_COMPLETE" not in os.environ else None
    if found is not None and run(*found):
        sys.exit(0)
    from .cli import main as cli_main

    cli_main()
