"""The old daemon's side of a takeover (wormholed/handover/takeover.py) with stand-in exports:
what a successor hears, and what the daemon is told, when the export refuses or fails."""

import asyncio

import pytest

from wormholed.handover import takeover
from wormholed.handover.record import HandoverError


async def ask(state_dir, export, resume):
    """Serve once with these callbacks; (what request() raised, what broken() was told)."""
    broken = []
    server = takeover.Server(str(state_dir), export, resume, broken.append)
    server.start()
    try:
        with pytest.raises(HandoverError) as info:
            await asyncio.to_thread(takeover.request, str(state_dir), 10)
    finally:
        await server.aclose()
    return str(info.value), broken


def test_an_export_that_refuses_leaves_the_daemon_serving(tmp_path):
    async def export():
        raise HandoverError("handing over needs 22 more file descriptors and has room for 18")

    async def resume(record, fds):
        raise AssertionError("nothing was exported")

    said, broken = asyncio.run(ask(tmp_path, export, resume))
    assert "has room for 18" in said and broken == []


def test_an_export_that_fails_tells_the_successor_and_stops_the_daemon(tmp_path):
    async def export():
        raise RuntimeError("a bug")

    async def resume(record, fds):
        raise AssertionError("there is nothing whole to take back")

    said, broken = asyncio.run(ask(tmp_path, export, resume))
    assert "failed to hand over (RuntimeError: a bug) and stops" in said
    assert broken == ["RuntimeError: a bug"]
