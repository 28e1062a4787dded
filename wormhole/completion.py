"""Shell completion for the CLI: click's own (`_WORMHOLE_COMPLETE=bash_source wormhole` prints
the script, see the README), with the candidates wormhole knows: create's words from the
grammar (spec.ARITY, so a word added there completes), the ids `delete` takes and the peers
`tunnel-delete` takes from the daemon (nothing, and no error, when it does not answer).

The callbacks run only when the shell asks, and import what they need then: a command run
by hand pays nothing for completion.

bash: click's script passes COMP_WORDS, which bash splits at every ':' (COMP_WORDBREAKS), so
`-H :6666 delete <TAB>` reached click as `-H`, `:`, `6666`, ... and completed nothing. The
script here also passes the line as typed up to the cursor, which is what is parsed, and
bash's own current word: a candidate loses what bash will not replace (`unix:` of
`unix:///x`)."""

from __future__ import annotations

import os

COMPLETION_TIMEOUT = 2.0  # a daemon that does not answer a completion's call within this: nothing offered
COMPLETE_VAR = "_WORMHOLE_COMPLETE"


def create_candidates(words: tuple[str, ...] | list[str], incomplete: str) -> list[str]:
    """What may follow WORDS in `create`: the grammar's words that start with INCOMPLETE, or
    nothing where the last word's argument goes (a URL, a host: nothing to offer)."""
    from .spec import ARITY

    i = 0
    while i < len(words):
        i += 1 + ARITY.get(words[i], 0)
    if i > len(words):
        return []
    return [word for word in ARITY if word.startswith(incomplete)]


def complete_words(ctx, param, incomplete):
    words = ctx.params.get(param.name)
    return create_candidates(words if isinstance(words, tuple) else (), incomplete)


def _daemon_rows(ctx, method: str) -> list[dict]:
    """METHOD's rows from the daemon the command line names (-H, -K, their variables or
    defaults); [] on any failure: completion never prints an error."""
    from .addr import Address

    root = ctx.find_root()
    addr, keyfile = root.params.get("addr"), root.params.get("key_file")
    if not isinstance(addr, Address) or not isinstance(keyfile, str):
        return []  # -H did not parse
    try:
        from .client import call_once
        from .keys import load_key

        rows = call_once(addr, load_key(keyfile), method, timeout=COMPLETION_TIMEOUT)
        return [r for r in rows if isinstance(r, dict)]
    except Exception:
        return []


def complete_ids(ctx, param, incomplete):
    """Ids of the wormholes `delete` takes (not children, which go with their parent)."""
    return [r["id"] for r in _daemon_rows(ctx, "list")
            if not r.get("parent") and isinstance(r.get("id"), str) and r["id"].startswith(incomplete)]


def complete_peers(ctx, param, incomplete):
    return [r["peer"] for r in _daemon_rows(ctx, "tunnel-list")
            if isinstance(r.get("peer"), str) and r["peer"].startswith(incomplete)]


def complete_commands(ctx, param, incomplete):
    group = ctx.parent.command
    return [name for name in group.list_commands(ctx) if name.startswith(incomplete)]


def bash_args(line: str, current: str) -> tuple[list[str], str, str]:
    """From the line as typed up to the cursor and bash's current word: (the arguments after
    the program's name, the word being completed, the part of it bash will not replace)."""
    from click.shell_completion import split_arg_string

    words = split_arg_string(line)[1:]
    incomplete = words.pop() if words and line and not line[-1].isspace() else ""
    keep = incomplete[:len(incomplete) - len(current)] if incomplete.endswith(current) else ""
    return words, incomplete, keep


def use_bash_line() -> None:
    """Replace click's bash completion with one that reads the command line as typed."""
    from click.shell_completion import BashComplete, add_completion_class

    passed = 'COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD'

    class Bash(BashComplete):
        source_template = BashComplete.source_template.replace(
            passed, passed + ' COMP_LINE="${COMP_LINE:0:COMP_POINT}" COMP_CUR="${COMP_WORDS[COMP_CWORD]}"')
        _keep = ""

        def get_completion_args(self):
            if "COMP_LINE" not in os.environ:  # a script from before: click's way
                return super().get_completion_args()
            args, incomplete, self._keep = bash_args(os.environ["COMP_LINE"], os.environ.get("COMP_CUR", ""))
            return args, incomplete

        def format_completion(self, item):
            if self._keep and item.value.startswith(self._keep):
                item.value = item.value[len(self._keep):]
            return super().format_completion(item)

    add_completion_class(Bash, "bash")
