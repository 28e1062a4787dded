"""wormholed/tunnels/xfrm.py against a kernel with ESP, and against iproute2 on that kernel.

For each state and policy (the ones an ipsec tunnel half builds, and the other shapes xfrm.py
can express), the same object is made twice, in two throwaway network namespaces: once through
xfrm.py's messages, once by `ip xfrm ... add` with the equivalent command line. What
`ip xfrm state` / `ip xfrm policy` then show must be the same text in both; what xfrm.py reads
back (its dump parser) must be the object it was given, from either namespace. Deleting by
(dst, SPI) and flushing must leave `ip xfrm state` empty.

The unit tests (unit_tests/test_xfrm.py) pin the encoded bytes against iproute2's; these check
the kernel's answer. They need ESP (the kernel lab: `make test-kernel`)."""

from __future__ import annotations

import re
import secrets
import subprocess
import uuid

import pytest

from harness import Namespace
from wormholed.tunnels import ipsec
from wormholed.tunnels.xfrm import Algorithm, Encap, Policy, Selector, State, Xfrm, gcm_aes

pytestmark = pytest.mark.kernel


# --- the same objects as `ip xfrm` command lines ---------------------------------------------------

def _alg(a: Algorithm, bits_name: str | None) -> list[str]:
    args = [a.name, "0x" + a.key.hex()]
    if bits_name:
        args.append(str(getattr(a, bits_name)))
    return args


def state_argv(s: State) -> list[str]:
    argv = ["ip", "xfrm", "state", "add", "src", s.src, "dst", s.dst, "proto", "esp", "spi", hex(s.spi),
            "reqid", str(s.reqid), "mode", s.mode, "replay-window", str(s.replay_window)]
    if s.aead:
        argv += ["aead", *_alg(s.aead, "icv_bits")]
    else:
        argv += ["auth-trunc", *_alg(s.auth, "trunc_bits"), "enc", *_alg(s.crypt, None)]
    if s.encap:
        argv += ["encap", "espinudp", str(s.encap.sport), str(s.encap.dport), "0.0.0.0"]
    if s.sel:
        argv += ["sel", "src", f"{s.sel.src}/{s.sel.src_len}", "dst", f"{s.sel.dst}/{s.sel.dst_len}"]
        if s.sel.proto:
            argv += ["proto", str(s.sel.proto)]
    return argv


def policy_argv(p: Policy) -> list[str]:
    argv = ["ip", "xfrm", "policy", "add", "src", f"{p.sel.src}/{p.sel.src_len}",
            "dst", f"{p.sel.dst}/{p.sel.dst_len}"]
    if p.sel.proto:
        argv += ["proto", str(p.sel.proto)]
    argv += ["dir", p.dir, "priority", str(p.priority), "action", p.action]
    if p.tmpl_src:
        argv += ["tmpl", "src", p.tmpl_src, "dst", p.tmpl_dst, "proto", "esp", "reqid", str(p.reqid),
                 "mode", "tunnel"]
    return argv


# --- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture
def two_ns():
    """Two empty network namespaces: ours (made through xfrm.py) and iproute2's."""
    made = []
    try:
        for who in ("py", "ip"):
            ns = Namespace(f"whx{who}{uuid.uuid4().hex[:6]}")
            made.append(ns)
        yield made
    finally:
        for ns in made:
            ns.close()


def run(ns: Namespace, argv: list[str]) -> str:
    done = ns.exec(*argv)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


def show(ns: Namespace, what: str) -> str:
    return run(ns, ["ip", "xfrm", what])


def half(udp: bool) -> ipsec.Half:
    return ipsec.Half(local_ip="100.64.0.1", remote_ip="100.64.0.2", local_endpoint="192.0.2.1",
                      remote_endpoint="192.0.2.2", reqid=ipsec.new_reqid([]), spi_in=ipsec.new_spi([]),
                      key_in=ipsec.new_key(), spi_out=ipsec.new_spi([]), key_out=ipsec.new_key(),
                      local_port=4500 if udp else 0, remote_port=4501 if udp else 0)


def other_states() -> list[State]:
    """Shapes xfrm.py can express beyond what a tunnel half uses."""
    return [
        State("2001:db8::1", "2001:db8::2", 0x3000, 8, aead=gcm_aes(secrets.token_bytes(20))),
        State("192.0.2.1", "192.0.2.2", 0x2000, 9, crypt=Algorithm("cbc(aes)", secrets.token_bytes(16)),
              auth=Algorithm("hmac(sha256)", secrets.token_bytes(32), trunc_bits=128), encap=Encap(4500, 4501)),
        State("192.0.2.1", "192.0.2.3", 0x4000, 10, aead=gcm_aes(secrets.token_bytes(20)), replay_window=0,
              sel=Selector("10.1.0.0", "10.2.0.0", 24, 24, proto=6)),
    ]


def other_policies() -> list[Policy]:
    return [
        Policy(Selector("fd00:1::", "fd00:2::", 64, 64), "in", "2001:db8::2", "2001:db8::1", reqid=8, priority=2000),
        Policy(Selector("fd00:1::", "fd00:2::", 64, 64, proto=6), "fwd", "192.0.2.2", "192.0.2.1", reqid=9),
        Policy(Selector("10.9.0.0", "10.8.0.0", 16, 16), "out", None, None, action="block", priority=7),
    ]


# kind: (the objects, how xfrm.py adds one, the `ip xfrm` command line, what xfrm.py reads back)
KINDS = {
    "state": (lambda: [s for udp in (False, True) for s in half(udp).states()] + other_states(),
              Xfrm.add_state, state_argv, lambda x: [st.state for st in x.states()]),
    "policy": (lambda: [*half(False).policies(), *other_policies()],
               Xfrm.add_policy, policy_argv, Xfrm.policies),
}


# --- the tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_kernel_shows_what_iproute2_would_have_made(two_ns, kind):
    make, add, argv, read = KINDS[kind]
    objects = make()
    py, ip = two_ns
    with Xfrm(py.name) as x:
        for obj in objects:
            add(x, obj)
    for obj in objects:
        run(ip, argv(obj))
    ours, theirs = show(py, kind), show(ip, kind)
    assert ours == theirs
    assert len(re.findall(r"^src ", ours, re.M)) == len(objects)
    for ns in two_ns:  # what xfrm.py reads back is what it was given, whoever made it
        with Xfrm(ns.name) as x:
            assert sorted(read(x), key=repr) == sorted(objects, key=repr)


def test_update_delete_and_flush(two_ns):
    py, _ = two_ns
    out, in_ = half(True).states()
    moved = State(out.src, out.dst, out.spi, out.reqid, aead=out.aead, encap=Encap(4510, 4511))
    rekeyed = State(out.src, out.dst, out.spi, out.reqid, aead=gcm_aes(ipsec.new_key()), encap=moved.encap)
    with Xfrm(py.name) as x:
        x.add_state(out)
        x.add_state(in_)
        with pytest.raises(OSError, match="EEXIST"):
            x.add_state(out)
        x.add_state(moved, update=True)  # UPDSA moves the encapsulation ...
        assert "encap type espinudp sport 4510 dport 4511" in show(py, "state")
        x.add_state(rekeyed, update=True)  # ... but keeps the keys (so ipsec.apply replaces such an SA)
        assert "0x" + out.aead.key.hex() in show(py, "state")
        assert "0x" + rekeyed.aead.key.hex() not in show(py, "state")
        assert sorted((st.state for st in x.states()), key=lambda s: s.spi) == sorted([moved, in_], key=lambda s: s.spi)
        x.delete_state(out.dst, out.spi)
        assert [st.state for st in x.states()] == [in_]
        with pytest.raises(OSError, match="ESRCH"):
            x.delete_state(out.dst, out.spi)
        for p in half(False).policies():
            x.add_policy(p)
            x.delete_policy(p.sel, p.dir)
        x.add_state(out)
        x.flush_states()
        assert show(py, "state") == "" and show(py, "policy") == ""
