"""Fixtures: test hosts and namespaces that are always cleaned up; daemon logs on failure."""

import contextlib
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
            try:
                if left := host.leftovers():
                    print(f"--- tunnel state of {host.name} ---\n" + "\n".join(left))
                    print(host.exec("wg", "show", "all").stdout)
            except Exception as e:  # the report must not hide the cleanup
                print(f"(tunnel state of {host.name} not read: {e})")
    errors = []
    for host in hosts:
        try:
            host.close()
        except Exception as e:  # close the others all the same
            errors.append(e)
    if errors:
        raise errors[0]


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


@pytest.fixture(scope="session", autouse=True)
def run_wireguard_mountpoint():
    """Each test host mounts a private tmpfs on /run/wireguard (wireguard-go's UAPI sockets)
    in its own mount namespace; the directory must exist. One made here is removed after."""
    from harness import RUN_WIREGUARD, become_subreaper, reap_orphans
    become_subreaper()  # wireguard-go, detached from wormholed, is reaped by us
    made = not RUN_WIREGUARD.exists()
    if made:
        RUN_WIREGUARD.mkdir(mode=0o755, parents=True)
    yield
    reap_orphans()
    if made:
        with contextlib.suppress(OSError):
            RUN_WIREGUARD.rmdir()
