"""Open file descriptors: the relay and engine tests check that each test leaves none behind.

Importable from unit_tests too (pyproject puts functional_tests on the path).
"""

from __future__ import annotations

import contextlib
import gc
import os


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def describe(fds) -> dict:
    """fd -> what it is (socket:[...], pipe:[...], a path), for the fds still open."""
    out = {}
    for fd in fds:
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return out


@contextlib.contextmanager
def no_new_fds():
    """Assert that the block leaves no fd open that was not open before it."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    assert not leaked, describe(leaked)
