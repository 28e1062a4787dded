"""The entry point of the one-file build (`make dist`, dist/wormhole): one executable that is
both commands, so that a host needs a single file copied to it and no Python.

It is `wormholed` when it is called by that name (a symlink or a copy named `wormholed`) or
when its first argument is `daemon` (`wormhole daemon -H :9999` is `wormholed -H :9999`), and
`wormhole` otherwise. The choice is made on argv before click sees it, and only the chosen
command's modules are imported: the CLI does not import the daemon's (uvloop, pyroute2,
docker), which keeps `wormhole` quick to start. `daemon` is also listed in the CLI's help,
where a stub says that it must come first.

Under systemd the file's bootloader is the service's main process and the daemon its child
(it unpacks the file, runs Python in a child, passes signals on and cleans up after it). The
bootloader hands socket activation over itself (LISTEN_PID), but not the watchdog: WATCHDOG_PID
names the bootloader, so the daemon would think the watchdog is another process's and never
ping it, and systemd would kill it after WatchdogSec. `adopt_watchdog` takes it over. (systemd
still needs NotifyAccess=all to take READY=1 and WATCHDOG=1 from a process not the main one.)

It lives in wormholed because wormholed may import wormhole and not the reverse.
"""

from __future__ import annotations

import os
import sys

DAEMON_NAME = "wormholed"
DAEMON_WORD = "daemon"


def wants_daemon(argv: list[str]) -> bool:
    """Called as wormholed, or as `wormhole daemon ...`."""
    return os.path.basename(argv[0]) == DAEMON_NAME or argv[1:2] == [DAEMON_WORD]


def adopt_watchdog(environ=os.environ) -> None:
    """WATCHDOG_PID names this process instead of its parent when the parent is this file's
    bootloader (the same executable), as the bootloader does itself for LISTEN_PID."""
    if not getattr(sys, "frozen", False):
        return
    parent = os.getppid()
    try:
        bootloader = os.readlink(f"/proc/{parent}/exe") == os.readlink("/proc/self/exe")
    except OSError:
        return
    if bootloader and environ.get("WATCHDOG_PID") == str(parent):
        environ["WATCHDOG_PID"] = str(os.getpid())


def main() -> None:
    argv = sys.argv
    if wants_daemon(argv):
        if argv[1:2] == [DAEMON_WORD]:
            del argv[1]
        adopt_watchdog()
        from wormholed.main import main as daemon_main
        daemon_main()
        return
    from wormhole import fast

    found = fast.plain(argv[1:]) if "_WORMHOLE_COMPLETE" not in os.environ else None
    if found is not None and fast.run(*found):  # `list` and `ping` without click, as `wormhole` does
        sys.exit(0)
    import click

    from wormhole.cli import cli, main as cli_main

    @cli.command(DAEMON_WORD, context_settings={"ignore_unknown_options": True}, add_help_option=False,
                 options_metavar="", short_help="Run the daemon: 'wormhole daemon FLAGS' is 'wormholed FLAGS'.")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[FLAGS]...")
    def daemon(args):
        """Run the daemon: 'wormhole daemon FLAGS' is 'wormholed FLAGS' (see 'wormhole daemon --help')."""
        raise click.UsageError(f"'{DAEMON_WORD}' must be the first argument: wormhole {DAEMON_WORD} [FLAGS]")

    cli_main()


if __name__ == "__main__":
    main()
