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


@pytest.mark.parametrize("error, said, broken", [
    # refused before anything stopped: the daemon serves on
    (HandoverError("handing over needs 22 more file descriptors and has room for 18"), "has room for 18", []),
    # failed part way: the successor hears it, and the daemon is told to stop
    (RuntimeError("a bug"), "failed to hand over (RuntimeError: a bug) and stops", ["RuntimeError: a bug"]),
])
def test_an_export_that_refuses_or_fails(tmp_path, error, said, broken):
    async def export():
        raise error

    async def resume(record, fds):
        raise AssertionError("there is nothing whole to take back")

    heard, told = asyncio.run(ask(tmp_path, export, resume))
    assert said in heard and told == broken
