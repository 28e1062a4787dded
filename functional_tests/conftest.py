"""Fixtures: test hosts and namespaces that are always cleaned up; daemon logs on failure."""

import itertools
import os

import pytest

from harness import Host, Namespace

_ids = itertools.count()


def _name(prefix):
    return f"{prefix}{os.getpid() % 10000}x{next(_ids)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def make_host(request):
    hosts = []

    def make(key=None, start=True, args=()):
        host = Host(_name("wh"), key)
        hosts.append(host)
        if start:
            host.start(*args)
        return host

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for host in hosts:
        if failed:
            print(f"\n--- wormholed log of {host.name} ---\n{host.logs()}")
        host.close()


@pytest.fixture
def host(make_host):
    return make_host()


@pytest.fixture
def make_ns():
    made = []

    def make():
        ns = Namespace(_name("ns"))
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.close()


@pytest.fixture(scope="session", autouse=True)
def etc_wormhole_mountpoint():
    """`ip netns exec` binds /etc/netns/NAME/wormhole over /etc/wormhole, which must exist."""
    from pathlib import Path

    from harness import ETC
    made = [d for d in (Path("/etc/netns"), ETC) if not d.exists()]
    for d in made:
        d.mkdir(mode=0o755)
    yield
    for d in reversed(made):
        d.rmdir()
