"""wormhole: the command line. The only place that prints or exits."""

from __future__ import annotations

import json
import sys
import time

import click

from .addr import Address, AddressError
from .client import call_once
from .keys import DEFAULT_KEYFILE, KeyFileError, client_context, keygen, load_key
from .protocol import RpcError
from .spec import MAX_LINKS, MAX_WORD_LENGTH, MAX_WORDS, SpecError, format_duration, parse, plan

CREATE_HELP = """Create a wormhole from chained WORDS; prints "ID URL" (URL: where its head listens).

\b
Words are read left to right; modifiers apply to the head until 'tail' or
'trigger' switches them to the tail:
  url URL            [tcp|udp://][NS@][HOST][:PORT]  (NS: a named netns)
  id ID              name the wormhole (default: a random UUID)
  docker-ns ID       live in that container's network namespace
  docker-run "ARGS"  'docker run -d ARGS' and live in its namespace
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

\b
Defaults: head tcp://127.0.0.1 on the given or an ephemeral port; the tail
dials 127.0.0.1 in the daemon's namespace on the head's port. max-conns and
idle-timeout default to the daemon's --max-conns and --idle-timeout, else
none for TCP and 4096 flows, 60s for UDP.

\b
Limits: {words} words, {length} characters a word, {links} child/chain/remote/
tunnel words in one create.

\b
Examples:
  wormhole create url :8080 tail url :80
  wormhole create url :53 tail url udp://dns@:53
  wormhole create url :3306 tail docker-ns mysql
  wormhole create url :80 trigger docker-run "wormhole/wordpress"
  wormhole create url :3306 tunnel myserver trigger docker-ns mysql
""".format(words=MAX_WORDS, length=MAX_WORD_LENGTH, links=MAX_LINKS)


class Ctx:
    def __init__(self, addr: Address, keyfile: str):
        self.addr, self.keyfile = addr, keyfile

    def call(self, method: str, params: dict | None = None):
        return call_once(self.addr, load_key(self.keyfile), method, params)


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
    """
    ctx.obj = Ctx(addr, key_file)


@cli.command()
@click.argument("host", required=False)
@click.pass_obj
def ping(obj: Ctx, host):
    """Round trip to the daemon (or through it to HOST's daemon), in milliseconds."""
    if host is None:  # from connecting to the answer: connection, TLS-PSK handshake, one round trip
        key = load_key(obj.keyfile)
        ctx = client_context(key)  # this process's own setup, not part of the round trip
        start = time.perf_counter()
        call_once(obj.addr, key, "ping", ctx=ctx)
        ms = (time.perf_counter() - start) * 1000
    else:
        ms = obj.call("ping", {"host": host})["ms"]
    click.echo(f"{ms:.3f}")


@cli.command(help=CREATE_HELP, context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def create(obj: Ctx, words):
    try:
        plan(parse(words))
    except SpecError as e:
        raise click.UsageError(str(e)) from None
    res = obj.call("create", {"words": list(words)})
    click.echo(f"{res['id']} {res['url']}")


@cli.command()
@click.argument("id")
@click.pass_obj
def delete(obj: Ctx, id):
    """Delete wormhole ID with its children (local and remote), containers and connections."""
    for warning in obj.call("delete", {"id": id}).get("warnings", []):
        click.echo(f"wormhole: warning: {warning}", err=True)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(obj: Ctx, as_json):
    """Wormholes: id, head, tail, state (armed/active/failed), connections (live/total), refused, bytes, limits, child.

    CHILD is the child wormhole's id, ID@HOST when it lives on another daemon."""
    rows = obj.call("list")
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table = [("ID", "HEAD", "TAIL", "STATE", "CONNS", "REFUSED", "BYTES IN/OUT", "LIMITS", "CHILD")]
    for r in rows:
        child = r.get("child") or (f"(on {r['remote']})" if r.get("remote") else "-")
        limits = [f"max-conns {r['max_conns']}"] if r.get("max_conns") else []
        limits += [f"idle-timeout {format_duration(r['idle_timeout'])}"] if r.get("idle_timeout") else []
        table.append((r["id"], r["head"], r["tail"], r["state"], f"{r['connections']}/{r['total']}",
                      str(r.get("refused", 0)), f"{r['bytes_in']}/{r['bytes_out']}", ", ".join(limits) or "-",
                      child))
    _print_table(table)


def _print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


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
    daemons; tunnel-delete removes both halves. HOST is a daemon address as for ping."""
    res = obj.call("tunnel-create", {"host": host, "type": kind, "udp": udp, "rekey": rekey})
    click.echo(f"{res['local_ip']} {res['remote_ip']}")


@cli.command("tunnel-delete")
@click.option("--force", is_flag=True, help="Also delete the wormholes that use the tunnel.")
@click.argument("host")
@click.pass_obj
def tunnel_delete(obj: Ctx, force, host):
    """Remove the tunnel to HOST: both halves. Refused while wormholes use it, unless --force."""
    for warning in obj.call("tunnel-delete", {"host": host, "force": force}).get("warnings", []):
        click.echo(f"wormhole: warning: {warning}", err=True)


@cli.command("tunnel-list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def tunnel_list(obj: Ctx, as_json):
    """Tunnels: peer, type, overlay pair (here-there), underlay endpoints, interface,
    latest handshake, bytes received/sent, state, and the wormholes that use each."""
    rows = obj.call("tunnel-list")
    if as_json:
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
    """Print a new random key for /etc/wormhole/key.secret (chmod 600 it)."""
    click.echo(keygen())


@cli.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_(ctx, command):
    """Show help for COMMAND (or for wormhole)."""
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
    try:
        cli.main(prog_name="wormhole", standalone_mode=False)
    except click.UsageError as e:
        hint = f" (see 'wormhole help {e.ctx.info_name}')" if e.ctx and e.ctx.parent else " (see 'wormhole help')"
        click.echo(f"wormhole: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except (RpcError, KeyFileError) as e:
        click.echo(f"wormhole: error: {e}", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"wormhole: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as e:  # never a traceback for the user
        click.echo(f"wormhole: error: {e.__class__.__name__}: {e}", err=True)
        sys.exit(1)
    sys.exit(0)
