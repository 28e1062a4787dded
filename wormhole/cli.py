"""wormhole: the command line. The only place that prints or exits.

Every command is a fresh process, so what it imports is most of what it costs. This module
imports click and what every command needs (addr, keys) at the top, and the rest where it
is used: client.py (the TLS call; json through protocol.py) on the first call to the daemon,
spec.py (the create grammar) in create and wherever a duration is shown, json for --json.
Nothing here imports asyncio: the daemon's asyncio client is async_client.py.
functional_tests/test_cli_fast.py checks that `import wormhole.cli` stays without it.

Shell completion is click's own; what it offers is completion.py's, which imports nothing
until the shell asks."""

from __future__ import annotations

import functools
import os
import sys
import time

import click

from . import completion
from .addr import Address, AddressError
from .keys import DEFAULT_KEYFILE, KeyFileError, keygen
from .tables import list_rates, list_table, table_lines

# Formatted (with the grammar's limits from spec) when the help is shown: _CreateCommand.
CREATE_HELP = """Create a wormhole from chained WORDS; prints "ID URL" (URL: where its head listens).

\b
Words are read left to right; modifiers apply to the head until 'tail' or
'trigger' switches them to the tail:
  url URL            [tcp|udp://][NS@][HOST][:PORT]  (NS: a named netns, docker:NAME@
                     a container's); a unix socket: unix://[NS@]/PATH, unix:[NS@]@NAME
  id ID              name the wormhole (default: a random UUID)
  docker-ns ID       live in that container's network namespace
  docker-run "ARGS"  'docker run -d ARGS' and live in its namespace
  k8s-ns NS/POD      live in that Kubernetes pod's network namespace on this node (found
                     through the container runtime; a tail finds it again for each connection)
  tail               following modifiers apply to the tail
  trigger            like tail; what follows runs on the first connection
  child              a child wormhole whose head starts as a copy of this tail
  chain              like child, and this tail connects to the child's head
  remote HOST        the following words build a child on HOST's daemon
  tunnel HOST        as remote, over an encrypted tunnel to HOST (made or reused
                     as by tunnel-create); the child listens on HOST's overlay address
  udptunnel HOST     as tunnel, UDP-encapsulated (ESP-in-UDP for ipsec; WireGuard is UDP)
  max-conns N        at most N connections (UDP: flows) at once; more are refused and counted
  idle-timeout D     close a connection (UDP: flow) with no bytes either way for D (30s, 5m, 1h)
  mode 0NNN          a unix head socket file's permissions (default 0660, owner root)
  add-tail           following modifiers apply to another tail: connections are spread
                     over the tails; one that refuses or times out is skipped and probed
  balance POLICY     round-robin (default) or least-conns

\b
Defaults: head tcp://127.0.0.1 on the given or an ephemeral port; the tail
dials 127.0.0.1 in the daemon's namespace on the head's port. max-conns and
idle-timeout default to the daemon's --max-conns and --idle-timeout, else
none for TCP and 4096 flows, 60s for UDP.

\b
Limits: {words} words, {length} characters a word, {links} child/chain/remote/
tunnel words, {tails} tails in one create.

\b
Examples:
  wormhole create url :8080 tail url :80
  wormhole create url :53 tail url udp://dns@:53
  wormhole create url :3306 tail docker-ns mysql
  wormhole create url :80 trigger docker-run "wormhole/wordpress"
  wormhole create url :3306 tunnel myserver trigger docker-ns mysql
  wormhole create url :2375 tail url unix:///var/run/docker.sock
  wormhole create url :80 tail url :8081 add-tail url :8082 balance least-conns
"""


class Ctx:
    """The daemon to call and the key to call it with. The key, its TLS context and the
    client module are loaded on the first call: commands that make none never pay for them."""

    def __init__(self, addr: Address, keyfile: str):
        self.addr, self.keyfile = addr, keyfile
        self._call = None

    def prepare(self):
        """Read the key, make the TLS context, import the client: all a call needs but the call."""
        if self._call is None:
            from .client import call_once
            from .keys import client_context, load_key

            key = load_key(self.keyfile)
            self._call = functools.partial(call_once, self.addr, key, ctx=client_context(key, lean=True))
        return self._call

    def call(self, method: str, params: dict | None = None, **kw):
        return self.prepare()(method, params, **kw)


def _addr(ctx, param, value):
    try:
        return Address.parse(value, default_host="127.0.0.1")
    except AddressError as e:
        raise click.BadParameter(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-H", "--host", "addr", default="127.0.0.1:9999", callback=_addr, metavar="ADDR",
              envvar="WORMHOLE_HOST", show_default=True,
              help="The daemon: tcp://host:port, host:port, :port, host, unix:///path.")
@click.option("-K", "--key-file", default=DEFAULT_KEYFILE, metavar="KEYFILE", envvar="WORMHOLE_KEY_FILE",
              show_default=True, help="Pre-shared key (the daemon's key.secret).")
@click.pass_context
def cli(ctx, addr, key_file):
    """wormhole: wire services together across network namespaces, containers and hosts.

    Talks to a wormholed daemon over TLS authenticated by a pre-shared key.

    \b
    Examples:
      wormhole create url :8000 tail url :7000
      wormhole -H myserver:9999 list
      wormhole help create
    """
    ctx.obj = Ctx(addr, key_file)


@cli.command()
@click.argument("host", required=False)
@click.pass_obj
def ping(obj: Ctx, host):
    """Round trip to the daemon (or through it to HOST's daemon), in milliseconds.

    \b
    Examples:
      wormhole ping               # this host's daemon
      wormhole ping myserver      # from this daemon to myserver's
    """
    if host is None:  # from connecting to the answer: connection, TLS-PSK handshake, one round trip
        call = obj.prepare()  # this process's own setup (key, TLS context), not part of the round trip
        start = time.perf_counter()
        call("ping")
        ms = (time.perf_counter() - start) * 1000
    else:
        ms = obj.call("ping", {"host": host})["ms"]
    click.echo(f"{ms:.3f}")


class _CreateCommand(click.Command):
    """create's help states the grammar's limits, which spec.py holds: they are filled in when
    the help is shown, so that commands other than create never import spec."""

    def format_help_text(self, ctx, formatter):
        from .spec import MAX_LINKS, MAX_TAILS, MAX_WORD_LENGTH, MAX_WORDS

        self.help = CREATE_HELP.format(words=MAX_WORDS, length=MAX_WORD_LENGTH, links=MAX_LINKS, tails=MAX_TAILS)
        super().format_help_text(ctx, formatter)


@cli.command(cls=_CreateCommand, help=CREATE_HELP,
             context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("words", nargs=-1, type=click.UNPROCESSED, shell_complete=completion.complete_words)
@click.pass_obj
def create(obj: Ctx, words):
    from .spec import SpecError, parse, plan

    try:
        plan(parse(words))
    except SpecError as e:
        raise click.UsageError(str(e)) from None
    res = obj.call("create", {"words": list(words)})
    click.echo(f"{res['id']} {res['url']}")


@cli.command()
@click.argument("id", shell_complete=completion.complete_ids)
@click.pass_obj
def delete(obj: Ctx, id):
    """Delete wormhole ID with its children (local and remote), containers and connections.

    \b
    Examples:
      wormhole delete db            # the wormhole made with 'id db'
      wormhole delete <TAB>         # the daemon's ids, with shell completion (README)
    """
    for warning in obj.call("delete", {"id": id}).get("warnings", []):
        click.echo(f"wormhole: warning: {warning}", err=True)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-w", "--watch", is_flag=True,
              help="Redraw the table every --interval seconds, with rates per second; Ctrl-C stops.")
@click.option("-n", "--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              metavar="SECONDS", help="How often --watch redraws.")
@click.pass_obj
def list_(obj: Ctx, as_json, watch, interval):
    """Wormholes: id, head, tail, state (armed/active/failed), connections (live/total), refused, bytes, limits, child.

    CHILD is the child wormhole's id, ID@HOST when it lives on another daemon. With --watch,
    CONN/S and BYTES/S IN/OUT are the rates since the previous redraw.

    \b
    Examples:
      wormhole list
      wormhole list --watch --interval 1
      wormhole list --json
    """
    if watch and as_json:
        raise click.UsageError("--watch draws the table; it does not go with --json")
    if watch:
        _watch(obj, interval)
        return
    rows = obj.call("list")
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=1))
        return
    _print_table(list_table(rows))


def _watch(obj: Ctx, interval: float) -> None:
    """`list --watch`: redraw in place on a terminal (cursor home, each line erased to its end,
    the rest of the screen cleared), else print each table after a blank line. The first
    call's error ends it (exit 1); later ones are shown in place of the table until the
    daemon answers again. Ctrl-C ends it with status 0."""
    try:
        rows = obj.call("list")
        from .rpc import RpcError  # (imported by the call)

        tty = sys.stdout.isatty()
        if tty:
            import shutil

            click.echo("\x1b[H\x1b[2J", nl=False)
        prev = prev_at = None
        while True:
            at = time.monotonic()
            title = f"Every {interval:g}s: wormhole list    {time.strftime('%Y-%m-%d %H:%M:%S')}"
            if isinstance(rows, list):
                rates = list_rates(prev, rows, at - prev_at) if prev is not None else {}
                lines = [title, ""] + table_lines(list_table(rows, rates))
                prev, prev_at = rows, at
            else:
                lines = [title, "", f"wormhole: error: {rows}"]
                prev = None
            if tty:
                width = shutil.get_terminal_size().columns
                click.echo("\x1b[H" + "".join(line[:width] + "\x1b[K\n" for line in lines) + "\x1b[J", nl=False)
            else:
                click.echo("\n".join(lines) + "\n")
            time.sleep(max(0.0, interval - (time.monotonic() - at)))
            try:
                rows = obj.call("list")
            except RpcError as e:
                rows = str(e)
    except KeyboardInterrupt:
        return


def _print_table(table: list[tuple[str, ...]]) -> None:
    for line in table_lines(table):
        click.echo(line)


@cli.command("tunnel-create")
@click.option("--type", "kind", type=click.Choice(["wireguard", "ipsec"]),
              help="Tunnel type (default: the daemon's --tunnel-type, wireguard unless told).")
@click.option("--udp", is_flag=True, help="UDP-encapsulated (ESP-in-UDP for ipsec; WireGuard is UDP already).")
@click.option("--rekey", is_flag=True,
              help="Replace the keys of a live ipsec tunnel on both ends; connections through it stay up. "
                   "(WireGuard rotates its session keys by itself.)")
@click.argument("host")
@click.pass_obj
def tunnel_create(obj: Ctx, kind, udp, rekey, host):
    """Build an encrypted tunnel between the daemon and HOST's daemon (same key.secret).

    Prints "SRC DST": the overlay addresses of this end and of HOST's end, a pair from
    the daemons' -C network. Running it again prints the same pair and changes nothing;
    a tunnel whose far half is gone (HOST rebooted) is rebuilt. Tunnels outlive the
    daemons; tunnel-delete removes both halves. HOST is a daemon address as for ping.

    \b
    Examples:
      wormhole tunnel-create myserver            # 100.66.12.6 100.66.12.7
      wormhole tunnel-create --type ipsec --udp myserver
      wormhole tunnel-create --rekey myserver    # new ipsec keys, connections stay up
    """
    res = obj.call("tunnel-create", {"host": host, "type": kind, "udp": udp, "rekey": rekey})
    click.echo(f"{res['local_ip']} {res['remote_ip']}")


@cli.command("tunnel-delete")
@click.option("--force", is_flag=True, help="Also delete the wormholes that use the tunnel.")
@click.argument("host", shell_complete=completion.complete_peers)
@click.pass_obj
def tunnel_delete(obj: Ctx, force, host):
    """Remove the tunnel to HOST: both halves. Refused while wormholes use it, unless --force.

    \b
    Examples:
      wormhole tunnel-delete myserver
      wormhole tunnel-delete --force myserver    # and the wormholes through it
    """
    for warning in obj.call("tunnel-delete", {"host": host, "force": force}).get("warnings", []):
        click.echo(f"wormhole: warning: {warning}", err=True)


@cli.command("tunnel-list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def tunnel_list(obj: Ctx, as_json):
    """Tunnels: peer, type, overlay pair (here-there), underlay endpoints, interface,
    latest handshake, bytes received/sent, state, and the wormholes that use each.

    \b
    Examples:
      wormhole tunnel-list
      wormhole tunnel-list --json
    """
    rows = obj.call("tunnel-list")
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=1))
        return
    table = [("PEER", "TYPE", "OVERLAY", "UNDERLAY", "INTERFACE", "HANDSHAKE", "RX/TX", "STATE", "USERS")]
    now = time.time()
    for r in rows:
        hs = r.get("latest_handshake")
        table.append((r["peer"], f"{r['type']}/{r['backend']}", f"{r['local_ip']}-{r['remote_ip']}",
                      f"{r['local_endpoint']}-{r['remote_endpoint']}", r["interface"],
                      f"{now - hs:.0f}s ago" if hs else "never", f"{r['rx_bytes']}/{r['tx_bytes']}", r["state"],
                      ",".join(r["users"]) or "-"))
    _print_table(table)


@cli.command("keygen")
def keygen_():
    """Print a new random key for /etc/wormhole/key.secret (chmod 600 it).

    \b
    Examples:
      (umask 077; wormhole keygen > /etc/wormhole/key.secret)
    """
    click.echo(keygen())


@cli.command("help")
@click.argument("command", required=False, shell_complete=completion.complete_commands)
@click.pass_context
def help_(ctx, command):
    """Show help for COMMAND (or for wormhole).

    \b
    Examples:
      wormhole help create
    """
    group = ctx.parent.command
    if command is None:
        click.echo(group.get_help(ctx.parent))
        return
    cmd = group.get_command(ctx, command)
    if cmd is None:
        raise click.UsageError(f"no command {command!r}; commands: {', '.join(group.list_commands(ctx))}")
    with click.Context(cmd, info_name=command, parent=ctx.parent) as sub:
        click.echo(cmd.get_help(sub))


def main() -> None:
    if completion.COMPLETE_VAR in os.environ:  # the shell asks for completions, or for its script
        completion.use_bash_line()
    try:
        cli.main(prog_name="wormhole", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see 'wormhole help {e.ctx.info_name}')" if e.ctx and e.ctx.parent else " (see 'wormhole help')"
        click.echo(f"wormhole: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except KeyFileError as e:
        click.echo(f"wormhole: error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"wormhole: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:  # never a traceback for the user
        from .rpc import RpcError  # (imported already if a call was made)

        if isinstance(e, RpcError):  # the daemon's error, or Failed (unreachable, wrong key)
            click.echo(f"wormhole: error: {e}", err=True)
        else:
            click.echo(f"wormhole: error: {e.__class__.__name__}: {e}", err=True)
        sys.exit(1)
    sys.exit(0)
