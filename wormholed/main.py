"""wormholed: flags, the uvloop event loop, signals, systemd activation and notification.

`run` owns the daemon's objects and their order: at start, stray containers
are swept, tunnels rediscovered (and repaired), then wormholes restored, and
only then READY=1; at stop, the control server's handlers (a `create` still
running is rolled back) and the tunnel monitor are cancelled first, then the
wormholes are closed. Tunnels stay up: they outlive the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import resource
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field

import click
import uvloop

from wormhole.addr import Address, AddressError
from wormhole.keys import DEFAULT_KEYFILE, KeyFileError, load_key
from wormhole.spec import SpecError, parse_count, parse_duration

from . import systemd
from .api import ControlServer, methods
from .handover import takeover, transfer
from .handover.daemon import adopt_wormholes, containers_of, describe, export_wormholes
from .handover.record import STATE_NAME, FdTable, HandoverError, decode, encode, fd_name
from .docker import Docker
from .limits import Defaults
from .metrics import Exporter, format_addr, parse_addr
from .peers import Peers
from .places import Places
from .proxy import native
from .proxy.native import EngineHub
from .segments import Env
from .state import RecordError, StateDir, StateLocked
from .tunnels.table import Settings, Tunnels
from .wormholes import Wormholes

log = logging.getLogger("wormholed")


@dataclass(frozen=True)
class Config:
    addrs: tuple[Address, ...]
    key: bytes
    state_dir: str
    internal_ip: str | None = None
    external_ip: str | None = None
    cidr: str = "100.64.0.0/14"
    ports: tuple[int, int] = (4500, 4599)
    tunnel_type: str = "wireguard"
    wireguard_go: str | None = None
    inherited: list = field(default_factory=list)  # sockets from systemd
    limits: Defaults = Defaults()
    metrics: tuple[str | None, int] | None = None  # --metrics: (host, None for every address; port)
    takeover: bool = False  # --takeover: take the running daemon's listeners and connections
    fd_store: bool = False  # --fd-store: on SIGTERM, leave them in systemd's fd store
    fd_store_max: int = 65536  # --fd-store-max: the unit's FileDescriptorStoreMax=
    stored: tuple[bytes, list[int]] | None = None  # a handover systemd's fd store gave back
    cri_socket: str | None = None  # --cri-socket: the container runtime k8s-ns places ask


@dataclass
class Handover:
    """What a predecessor handed over: the decoded record, its fds in table order, and the
    names to take out of systemd's fd store once adopted (none after --takeover)."""

    state: dict
    fds: list[int]
    store_names: list[str] = field(default_factory=list)


class StartError(Exception):
    pass


def bind(addr: Address) -> socket.socket:
    """A listening socket for the control channel."""
    if addr.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(addr.path).st_mode):
                os.unlink(addr.path)  # stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr.path)
            os.chmod(addr.path, 0o600)
        except OSError:
            sock.close()
            raise
    elif addr.host is None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("::", addr.port))
        except OSError:
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", addr.port))
    else:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr.host, addr.port))
        except OSError:
            sock.close()
            raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> None:
    """Each relayed connection holds 2 sockets and up to 4 pipe fds: allow the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_engine() -> EngineHub | None:
    """The native TCP engine, unless WORMHOLE_ENGINE=python or it was not built."""
    try:
        choice = native.wanted()
    except ValueError as e:
        raise StartError(str(e)) from None
    if choice == "python":
        log.info("TCP engine: python (WORMHOLE_ENGINE=python)")
        return None
    if not native.available():
        log.warning("TCP engine: python (the native engine is not built: %s)", native.IMPORT_ERROR)
        return None
    log.info("TCP engine: native")
    return EngineHub()


async def run(config: Config) -> None:
    raise_fd_limit()
    state = StateDir(config.state_dir)
    handover = None
    try:
        state.ensure()
        if config.takeover:
            handover = await _take_over(config, state)
        else:
            state.lock()
    except (RecordError, StateLocked) as e:
        raise StartError(str(e)) from None
    if handover is None and config.stored is not None:
        handover = _from_store(*config.stored)
    try:
        await _run(config, state, handover)
    finally:
        state.unlock()


async def _take_over(config: Config, state: StateDir) -> Handover:
    """Ask the running daemon for everything; once it is ours, wait for it to exit (its exit
    releases the state dir's lock)."""
    try:
        record, fds, commit = await asyncio.to_thread(takeover.request, config.state_dir)
    except HandoverError as e:
        raise StartError(f"cannot take over: {e}") from None
    commit()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + takeover.TIMEOUT
    while True:
        try:
            state.lock()
            break
        except StateLocked:
            if loop.time() > deadline:
                raise StartError("the wormholed that handed over did not exit") from None
            await asyncio.sleep(0.01)
    log.info("took over %d wormhole(s), %d fds from pid %s", len(record["wormholes"]), len(fds),
             record.get("from", {}).get("pid"))
    return Handover(record, fds)


def _from_store(record: bytes, fds: list[int] | None) -> Handover | None:
    """The handover systemd's fd store held (a restart under systemd), if it can be taken."""
    names = [fd_name(i) for i in range(len(fds or ()))] + [STATE_NAME]
    try:
        if fds is None:
            raise HandoverError("some of its fds did not come back")
        state = decode(record, len(fds))
    except HandoverError as e:
        log.error("the fd store held a handover that cannot be taken (%s); its connections are closed", e)
        for fd in fds or ():
            os.close(fd)
        with contextlib.suppress(OSError):
            transfer.unstore(os.environ.get("NOTIFY_SOCKET", ""), names)
        return None
    log.info("took over %d wormhole(s), %d fds from systemd's fd store", len(state["wormholes"]), len(fds))
    return Handover(state, fds, names)


async def _run(config: Config, state: StateDir, handover: Handover | None = None) -> None:
    daemon_id = state.daemon_id()
    docker = Docker(daemon_id)
    peers = Peers(config.key)
    tunnels = Tunnels(state.tunnels, peers, config.key, daemon_id, Settings(
        cidr=config.cidr, ports=config.ports, internal_ip=config.internal_ip, external_ip=config.external_ip,
        default_type=config.tunnel_type, wireguard_go=config.wireguard_go))
    hub = start_engine()
    places = Places(docker, config.cri_socket)
    wormholes = Wormholes(state, Env(places, peers, tunnels, daemon_id, engine=hub, limits=config.limits))
    control = ControlServer(methods(wormholes, peers, tunnels), config.key)
    socks = list(config.inherited)
    made = []
    tasks: dict[str, object] = {"monitor": None, "exporter": None}  # what a handover stops and restarts
    server = None

    def start_metrics() -> None:
        if config.metrics is not None:
            exporter = tasks["exporter"] = Exporter(wormholes, tunnels, control)
            try:
                exporter.start(*config.metrics)
            except OSError as e:
                raise StartError(f"cannot serve metrics on {format_addr(*config.metrics)}: "
                                 f"{e.strerror or e}") from None
            log.info("metrics on http://%s/metrics", format_addr(*config.metrics))

    async def stop_serving() -> None:
        if tasks["exporter"] is not None:
            await tasks["exporter"].aclose()
            tasks["exporter"] = None
        if tasks["monitor"] is not None:
            tasks["monitor"].cancel()
        await control.aclose()
        if tasks["monitor"] is not None:
            await asyncio.gather(tasks["monitor"], return_exceptions=True)
            tasks["monitor"] = None

    async def export() -> tuple[bytes, list[int]]:
        """Stop serving and describe everything for a successor (handover/). HandoverError,
        before anything stops, when this process has no room for the fds it would duplicate."""
        heads = sum(seg.head_sock is not None for root in wormholes.roots() for seg in root.chain())
        transfer.room_for(len(socks) + heads, "handing over")
        table = FdTable()
        control_fds = [table.add(os.dup(sock.fileno())) for sock in socks if sock.fileno() >= 0]
        await stop_serving()
        entries = await export_wormholes(wormholes, table)
        log.info("handover: %s", describe(entries))
        record = encode({"from": {"pid": os.getpid(), "daemon": daemon_id}, "fds": len(table.fds),
                         "control": control_fds, "wormholes": entries})
        return record, table.fds

    async def adopt(given: Handover) -> frozenset[str]:
        have = {(s.family, s.getsockname()) for s in socks if s.fileno() >= 0}
        for i in given.state["control"]:
            sock = socket.socket(fileno=given.fds[i])
            if (sock.family, sock.getsockname()) in have:  # systemd passed it again (its .socket unit)
                sock.close()
                continue
            socks.append(sock)
            await control.serve(sock)
            if sock.family == socket.AF_UNIX and isinstance(sock.getsockname(), str) and sock.getsockname():
                made.append(sock.getsockname())
        return await adopt_wormholes(wormholes, given.state["wormholes"], given.fds, log)

    async def resume(record: bytes, fds: list[int]) -> None:
        """A successor did not take what export() gave: take it back, as a successor would."""
        wormholes.forget()
        await adopt(Handover(decode(record, len(fds)), fds))
        tasks["monitor"] = asyncio.create_task(tunnels.monitor())
        start_metrics()

    try:
        if handover is None or not handover.state["control"]:
            for addr in config.addrs:
                try:
                    socks.append(bind(addr))
                except OSError as e:
                    raise StartError(f"cannot listen on {addr}: {e.strerror or e}") from None
                if addr.kind == "unix":
                    made.append(addr.path)
        for sock in socks:
            await control.serve(sock)
        start_metrics()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await docker.remove_strays(keep=containers_of(handover.state["wormholes"]) if handover else frozenset())
        await tunnels.rediscover()
        tasks["monitor"] = asyncio.create_task(tunnels.monitor())
        adopted = frozenset()
        if handover is not None:
            adopted = await adopt(handover)
            if handover.store_names:  # ours now: the store must not hold connections open
                with contextlib.suppress(OSError):
                    transfer.unstore(os.environ.get("NOTIFY_SOCKET", ""), handover.store_names)
        await wormholes.restore(skip=adopted)
        where = ", ".join(str(a) for a in config.addrs) or f"{len(config.inherited)} socket(s) from systemd"
        if handover is not None and handover.state["control"]:
            where = f"{len(handover.state['control'])} socket(s) taken over"
        log.info("listening on %s", where)
        broken: list[str] = []  # why a handover's export failed: the daemon stops (exit 1)
        server = takeover.Server(config.state_dir, export, resume, lambda why: (broken.append(why), stop.set()))
        server.start()
        systemd.notify("READY=1")
        systemd.start_watchdog()
        await stop.wait()
        log.info("stopping")
        systemd.notify("STOPPING=1")
        if broken:
            raise StartError(f"stopped: a handover's export failed ({broken[0]}); start again to restore")
        if config.fd_store and os.environ.get("NOTIFY_SOCKET"):
            await _store_and_exit(export, resume, config.fd_store_max)
    finally:
        if server is not None:
            await server.aclose()
        await stop_serving()
        await wormholes.aclose()
        places.close()
        if hub is not None:
            hub.close()
        tunnels.close()
        for sock in socks:
            sock.close()
        for path in made:
            with contextlib.suppress(OSError):
                os.unlink(path)


async def _store_and_exit(export, resume, most: int) -> None:
    """--fd-store: hand everything to systemd's fd store and exit without teardown; the next
    start takes it back (LISTEN_FDS). If the store is not there, or too small for all of it
    (systemd would refuse the fds past FileDescriptorStoreMax), take it back and stop as
    without --fd-store, saying so."""
    try:
        record, fds = await export()
    except HandoverError as e:
        log.error("cannot hand over to systemd's fd store: %s; stopping without handover", e)
        return
    if len(fds) + 1 > most:
        log.error("%d fds (listeners, connections, and the record) do not fit in systemd's fd store "
                  "(--fd-store-max %d, the unit's FileDescriptorStoreMax=): stopping without handover, "
                  "live connections are closed; 'wormholed --takeover' hands over any number", len(fds) + 1, most)
        await resume(record, fds)
        return
    try:
        transfer.store(os.environ["NOTIFY_SOCKET"], record, fds)
    except OSError as e:
        log.error("cannot put %d fds in systemd's fd store (%s); stopping without handover", len(fds), e)
        await resume(record, fds)
        return
    log.info("handed %d fds to systemd's fd store; exiting", len(fds))
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def _ip(ctx, param, value):
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IP address") from None


def _cidr(ctx, param, value):
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a network like 100.64.0.0/14") from None
    if net.num_addresses < 2:
        raise click.BadParameter(f"{value!r} holds no pair of addresses")
    return str(net)


def _ports(ctx, param, value):
    lo, sep, hi = value.partition("-")
    if sep and re.fullmatch(r"[0-9]{1,5}", lo) and re.fullmatch(r"[0-9]{1,5}", hi) and 0 < int(lo) <= int(hi) < 65536:
        return int(lo), int(hi)
    raise click.BadParameter(f"{value!r} is not a port range like 4500-4599")


def _count(ctx, param, value):
    try:
        return None if value is None else parse_count(value, "value")
    except SpecError as e:
        raise click.BadParameter(str(e)) from None


def _duration(ctx, param, value):
    try:
        return None if value is None else parse_duration(value, "value")
    except SpecError as e:
        raise click.BadParameter(str(e)) from None


def _metrics(ctx, param, value):
    try:
        return None if value is None else parse_addr(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _addrs(ctx, param, values):
    try:
        return tuple(Address.parse(v) for v in values)
    except AddressError as e:
        raise click.BadParameter(str(e)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-H", "--host", "addrs", multiple=True, callback=_addrs, metavar="ADDR",
              help="Listen for commands on ADDR: tcp://host:port, host:port, :port, unix:///path. "
                   "Repeatable. Default tcp://:9999 (all addresses), unless systemd passes sockets.")
@click.option("-K", "--key-file", default=DEFAULT_KEYFILE, show_default=True, metavar="KEYFILE",
              help="Pre-shared key; must not be readable by group or others.")
@click.option("-I", "--internal-ip", callback=_ip, metavar="IP",
              help="This host's underlay address for tunnels (default: the source address of the route toward "
                   "each peer, which is the default route's for most peers).")
@click.option("-E", "--external-ip", callback=_ip, metavar="IP", help="The address peers send tunnel traffic to, when NAT makes it differ from -I (default: -I).")
@click.option("-C", "--cidr", default="100.64.0.0/14", show_default=True, callback=_cidr,
              help="Overlay network tunnels take their address pairs from (the same on all hosts).")
@click.option("-P", "--ports", default="4500-4599", show_default=True, callback=_ports, metavar="LO-HI",
              help="UDP ports tunnels listen on (WireGuard; ESP-in-UDP).")
@click.option("--tunnel-type", type=click.Choice(["wireguard", "ipsec"]), default="wireguard", show_default=True,
              help="Type of the tunnels that 'tunnel' words and tunnel-create build unless told.")
@click.option("--wireguard-go", "wireguard_go", metavar="PATH",
              help="Userspace WireGuard to run when the kernel has no WireGuard module "
                   "(default: wireguard-go on PATH).")
@click.option("--state-dir", default="/var/lib/wormhole", show_default=True, metavar="DIR",
              help="Where wormhole records are kept across restarts.")
@click.option("--max-conns", callback=_count, metavar="N",
              help="Default for wormholes without 'max-conns': at most N connections (UDP: flows) each "
                   "at once, more refused and counted (default: no limit for TCP, 4096 UDP flows).")
@click.option("--idle-timeout", callback=_duration, metavar="DURATION",
              help="Default for wormholes without 'idle-timeout': close a connection (UDP: flow) without "
                   "bytes either way for DURATION, e.g. 30s, 5m, 1h (default: none for TCP, 60s for UDP).")
@click.option("--metrics", callback=_metrics, metavar="ADDR",
              help="Serve Prometheus metrics at http://ADDR/metrics: HOST:PORT (e.g. 127.0.0.1:9998), "
                   "or :PORT for every address (default: not served).")
@click.option("--takeover", is_flag=True,
              help="Take over from the wormholed running on the same --state-dir: its listeners, live "
                   "connections (bytes in flight included), UDP flows and control sockets move to this "
                   "process, and it exits. An upgrade or restart that drops no connection.")
@click.option("--fd-store", is_flag=True,
              help="Under systemd (FileDescriptorStoreMax= set): on SIGTERM, leave the listeners and live "
                   "connections in systemd's fd store, and take them back at the next start.")
@click.option("--fd-store-max", type=click.IntRange(min=1), default=65536, show_default=True, metavar="N",
              help="The unit's FileDescriptorStoreMax=: with more fds to store, --fd-store stops without "
                   "handover (saying so) rather than lose some.")
@click.option("--cri-socket", default="/run/containerd/containerd.sock", show_default=True, metavar="PATH",
              help="The container runtime's CRI socket, asked where a k8s-ns NAMESPACE/POD's network namespace "
                   "is (needs the 'k8s' extra: pip install 'ns-wormhole[k8s]').")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(addrs, key_file, internal_ip, external_ip, cidr, ports, tunnel_type, wireguard_go, state_dir, max_conns,
        idle_timeout, metrics, takeover, fd_store, fd_store_max, cri_socket, verbose):
    """The wormhole daemon: runs the proxies `wormhole create` asks for.

    Runs as root. Commands arrive over TLS 1.3 authenticated by the pre-shared
    key in KEYFILE; `wormhole keygen` makes one.
    """
    systemd.setup_logging(verbose)
    try:
        key = load_key(key_file)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None
    record, stored_fds, others = transfer.from_store(systemd.listen_fds())
    inherited = [socket.socket(fileno=fd) for fd in others]
    if not addrs and not inherited and record is None and not takeover:
        addrs = (Address.parse(":9999"),)
    config = Config(addrs, key, state_dir, internal_ip, external_ip or internal_ip, cidr, ports,
                    tunnel_type, wireguard_go, inherited, Defaults(max_conns, idle_timeout), metrics,
                    takeover, fd_store, fd_store_max, (record, stored_fds) if record is not None else None,
                    cri_socket)
    try:
        uvloop.run(run(config))
    except StartError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": ")) from None


def main() -> None:
    try:
        cli.main(prog_name="wormholed", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"wormholed: {e.format_message()} (see 'wormholed --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"wormholed: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(1)
    sys.exit(0)
