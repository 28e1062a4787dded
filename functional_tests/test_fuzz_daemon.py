"""Fuzzing one live daemon over its control channel (hypothesis), then checking what it left.

One wormholed in a test host, one TLS-PSK connection to its unix socket, and in turn:
random `create` word lists (the strategies of unit_tests/test_fuzz_grammar.py, with
ports, hosts, namespaces and peers this host can take); random methods with params of
random JSON types; raw lines (random bytes, broken and deep JSON, UTF-16/32); lines
around the 1 MiB limit. Properties: every request line gets one JSON-RPC result or
error object on the same connection (no silence, no close), and no example writes a
traceback to the daemon's log. Afterwards: `wormhole ping` works; `list` shows exactly
the wormholes whose create succeeded (nothing half-created); once those are deleted
`list` is empty, nothing listens that did not before (in the host's namespace and in
the netns the words may name), and no tunnel was made.

What the fuzz keeps away from, so that it stays fast and hermetic:
- peers (`remote`/`tunnel`/`udptunnel` HOST, `ping`/`tunnel-*` host) that would answer:
  only unroutable addresses (TEST-NET, 2001:db8::), unresolvable names and closed
  loopback ports; a peer on a loopback or wildcard address with the control port or a
  fuzzed port is rejected (`answering_peer`), as it would be this daemon or a fuzzed
  wormhole (a child on itself, or a tail retried for 5 s);
- Docker: the daemon runs with DOCKER_HOST on a socket that does not exist, so
  `docker-ns`/`docker-run` fail at once (with `trigger` the create succeeds: nothing is
  started before a connection, and nothing connects);
- named netns: only one made for the test, and names that do not exist;
- `tunnel-build` with a plausible overlay pair (it would build WireGuard): its params
  are random JSON only.
The bugs the fuzz found are regression tests at the end.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness import SLOW
from unit_tests.test_fuzz_grammar import (HOSTILE, JSON, METHODS, RPC_METHODS, create_words, deep_json,
                                          lines, readme_like, word_args)
from wormhole import protocol
from wormhole.addr import Address
from wormhole.keys import client_context
from wormhole.protocol import MAX_LINE
from wormhole.spec import LINK_ARITY_WORDS
from wormholed.wormholes import owned_id

CONTROL_PORT = 9999
PORTS = range(20000, 20064)  # heads listen here (and on ephemeral ports, and any the hostile words say)
REPLY_TIMEOUT = 20 * SLOW  # an unroutable peer fails at once; a slow answer is a failure too
UNREACHABLE = st.sampled_from(("192.0.2.1", "192.0.2.1:9999", "[2001:db8::1]", "[2001:db8::1]:1", "127.0.0.1:1",
                               "[::1]:1", "fuzz.invalid", "fuzz.invalid:9999", "[fe80::1%eth0]", "a.",
                               "198.51.100.7:20001"))
BINDABLE = ("127.0.0.1", "127.0.0.1", "127.0.0.2", "0.0.0.0", "[::1]", "[::]", "localhost", "[::ffff:127.0.0.1]")
UNBINDABLE = ("192.0.2.1", "[2001:db8::1]", "fuzz.invalid", ".".join(["a" * 63] * 40))
# no example database: the daemon's state carries over from example to example, so a saved
# example would not replay the same way
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


# --- the channel -----------------------------------------------------------------------


class Channel:
    """One TLS-PSK connection to the daemon, on an event loop of its own: write bytes, read
    reply lines. Reading goes on while writing, so that a big reply never blocks a big request."""

    def __init__(self, path: str, key: bytes):
        self.loop = asyncio.new_event_loop()
        self.reader, self.writer = self.loop.run_until_complete(
            asyncio.open_unix_connection(path, ssl=client_context(key), server_hostname=""))
        self.framer = protocol.LineFramer(limit=16 * MAX_LINE)  # `echo` answers a 1 MiB line with more
        self.early: list = []

    def exchange(self, data: bytes, replies: int) -> list[dict]:
        assert not self.early, f"replies nobody asked for: {self.early[:3]}"
        try:
            lines = self.loop.run_until_complete(asyncio.wait_for(self._exchange(data, replies), REPLY_TIMEOUT))
        except TimeoutError:
            raise AssertionError(f"no answer within {REPLY_TIMEOUT} s to {data[:300]!r}") from None
        return [json.loads(line) for line in lines]

    async def _exchange(self, data: bytes, replies: int) -> list[bytes]:
        self.writer.write(data)
        drained = asyncio.ensure_future(self.writer.drain())
        while len(self.early) < replies:
            chunk = await self.reader.read(1 << 16)
            assert chunk, f"the daemon closed the connection after {data[:300]!r}"
            self.early.extend(self.framer.feed(chunk))
        await drained
        got, self.early = self.early[:replies], self.early[replies:]
        return got

    def call(self, method: str, params) -> dict:
        [reply] = self.exchange(request(1, method, params), 1)
        return check_reply(reply, 1)

    def close(self) -> None:
        self.writer.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def channel(host) -> Channel:
    return Channel(host.sock.removeprefix("unix://"), host.key.encode())


def request(id_, method, params) -> bytes:
    return protocol.encode({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})


def check_reply(reply, id_=None) -> dict:
    """A JSON-RPC 2.0 response object: a result, or an error with an int code and a message."""
    assert isinstance(reply, dict) and reply.get("jsonrpc") == "2.0", reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str), reply
    if id_ is not None:
        assert reply.get("id") == id_, reply
    return reply


# --- what the fuzz sends -------------------------------------------------------------------


def answering_peer(host: str) -> bool:
    """A peer address that this daemon or a fuzzed wormhole would answer on."""
    try:
        addr = Address.parse(host)
    except ValueError:
        return False  # refused by the daemon as well
    if addr.port != CONTROL_PORT and addr.port not in PORTS and addr.host not in (None, "localhost"):
        return False
    if addr.host in (None, "localhost"):
        return True
    try:
        ip = ipaddress.ip_address(addr.host.partition("%")[0])
    except ValueError:
        return False  # a name: only unresolvable ones are generated
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


def create_peers(words) -> list[str]:
    return [host for w, host in zip(words, words[1:]) if w in LINK_ARITY_WORDS]


def daemon_args(netns: str, *, hostile: bool) -> dict:
    """Arguments for this host: URLs on the fuzz's ports, in its namespace or the test's
    netns; peers that fail at once. Plausible ones build (but for docker and unbindable
    hosts), hostile ones mostly do not."""
    names = st.from_regex(r"fuzz-[a-z0-9]{1,8}", fullmatch=True)
    if not hostile:
        return word_args(ports=st.sampled_from(PORTS), hosts=st.sampled_from(BINDABLE), peers=UNREACHABLE,
                         names=names, places=st.just(netns), images=names, hostile=False)
    return word_args(ports=st.sampled_from(PORTS), hosts=st.sampled_from(BINDABLE + UNBINDABLE), peers=UNREACHABLE,
                     names=names | st.just(netns), images=names, hostile=True)


def create_batches(netns: str):
    """Up to four creates at a time, words mostly as the README writes them with arguments that
    build, else any of create_words'; and now and then the delete of one already made (an
    index into those)."""
    good = daemon_args(netns, hostile=False)
    readme = readme_like(good)
    words = st.one_of(readme, readme, readme, create_words(daemon_args(netns, hostile=True), good, max_clauses=8))
    return st.lists(st.one_of(words, words, words, st.integers(0, 1 << 16)), min_size=1, max_size=4)


def method_calls(netns: str):
    """(method, params): real and random methods, params of random JSON types, and params
    shaped as each real method wants them, with plausible and hostile values."""
    args = daemon_args(netns, hostile=True)
    words = st.one_of(readme_like(daemon_args(netns, hostile=False)), create_words(args, max_clauses=4, limits=False))
    peer = st.one_of(args["remote"], HOSTILE, JSON)  # the peers of create's words, and random ones
    text = st.one_of(st.text(max_size=12), JSON)
    name = st.one_of(args["id"], JSON)
    shaped = st.one_of(
        st.tuples(st.just("ping"), st.fixed_dictionaries({"host": peer})),
        st.tuples(st.sampled_from(("delete", "create")), st.fixed_dictionaries({"id": text, "words": words | JSON})),
        st.tuples(st.just("child"), st.fixed_dictionaries(
            {"words": words | JSON, "id": name, "owner": name},
            optional={"service_port": st.sampled_from(PORTS) | JSON, "proto": st.sampled_from(("tcp", "udp")) | JSON,
                      "parent": text, "tunnel": JSON, "host": text})),
        st.tuples(st.just("tunnel-create"), st.fixed_dictionaries(
            {"host": peer}, optional={"type": st.sampled_from(("wireguard", "ipsec")) | JSON, "udp": JSON})),
        st.tuples(st.just("tunnel-delete"), st.fixed_dictionaries({"host": peer}, optional={"force": JSON})),
        st.tuples(st.sampled_from(("tunnel-hello", "tunnel-destroy")),
                  st.fixed_dictionaries({"daemon_id": text}, optional={"type": JSON})),
    )
    anything = st.tuples(METHODS, st.one_of(st.dictionaries(st.text(max_size=8), JSON, max_size=4), JSON))
    return st.one_of(shaped, shaped, anything)


def raw_lines():
    """Bytes for one write, ending in a newline: random lines (several, when they hold a
    newline), broken or deep JSON, and lines around MAX_LINE."""
    big = st.builds(lambda size, filler: sized_echo(size, filler),
                    st.sampled_from((MAX_LINE - 1, MAX_LINE, MAX_LINE + 1, 3 * MAX_LINE)), st.sampled_from("a[{\""))
    return st.one_of(lines(), lines(), deep_json().map(str.encode), big).map(lambda b: b + b"\n")


def sized_echo(size: int, filler: str) -> bytes:
    """An echo request of exactly `size` bytes, padded with `filler` in a string (brackets in a
    string do not count as nesting)."""
    head, tail = b'{"jsonrpc":"2.0","id":"big","method":"echo","params":{"x":"', b'"}}'
    pad = filler.replace('"', '\\"').encode()
    n = size - len(head) - len(tail)
    return head + (pad * (n // len(pad) + 1))[:n] + tail if n > 0 else b"x" * size


# --- the checks ----------------------------------------------------------------------------


def listening(ns) -> set[str]:
    """TCP and UDP sockets bound for listening in ns (a Host or Namespace), as `ss` shows them."""
    r = ns.exec("ss", "-Htuln")
    assert r.returncode == 0, r.stderr
    return {" ".join((f[0], f[4])) for f in map(str.split, r.stdout.splitlines())}


class LogWatch:
    """The daemon log since the last look."""

    def __init__(self, path):
        self.path, self.offset = path, 0

    def new(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        self.offset += len(data)
        return data.decode(errors="replace")


def roots(rows: list[dict]) -> dict[str, str]:
    """id -> the id of the root wormhole it belongs to (its parents followed up)."""
    parent = {row["id"]: row.get("parent") for row in rows}
    out = {}
    for ident in parent:
        root = ident
        while parent.get(root) in parent:
            root = parent[root]
        out[ident] = root
    return out


@pytest.mark.timeout(300)
def test_fuzzed_requests_get_answers_and_leave_nothing(make_host, make_ns):
    ns = make_ns()
    host = make_host(start=False)
    host.start(env=dict(os.environ, DOCKER_HOST="unix:///nonexistent/docker.sock"))
    before = {"host": listening(host), "ns": listening(ns)}
    ch = channel(host)
    log = LogWatch(host.log)
    log.new()
    created: dict[str, list[str]] = {}  # root id -> its words, for each create that succeeded
    seen = collections.Counter()  # what was sent and answered: printed, for a report
    ids = iter(range(1, 1 << 30))

    def settle(sent, replies) -> None:
        """Check the replies and the log; note what was created or deleted."""
        for reply in replies:
            check_reply(reply)
        new = log.new()
        assert "Traceback" not in new, f"after {sent!r}:\n{new}"
        replaced = set()  # children asked for again by their owner: the old one is deleted first
        for (method, params), reply in zip(sent, replies):
            result = reply.get("result")
            kind = method if method in RPC_METHODS else "line" if method is None else "other"
            seen[f"{kind} {'ok' if 'result' in reply else reply['error']['code']}"] += 1
            if method == "child" and "error" in reply and isinstance(params, dict) \
                    and all(isinstance(params.get(k), str) for k in ("id", "owner")):
                replaced.add(owned_id(params["id"], params["owner"]))
            if method in ("create", "child") and isinstance(result, dict) and "id" in result:
                created[result["id"]] = params.get("words")
            elif method == "delete" and isinstance(result, dict) and result.get("id") in created:
                del created[result["id"]]
        if replaced & set(created):  # and the new one failed: is the old one gone?
            listed = {row["id"] for row in ch.call("list", {})["result"]}
            for ident in replaced & set(created) - listed:
                del created[ident]

    def send(calls: list[tuple[str, object]]) -> None:
        numbered = [(next(ids), method, params) for method, params in calls]
        replies = ch.exchange(b"".join(request(i, m, p) for i, m, p in numbered), len(numbered))
        for (i, _, _), reply in zip(numbered, replies):
            check_reply(reply, i)
        settle(calls, replies)

    @settings(FUZZ, max_examples=1000)
    @given(create_batches(ns.name))
    def creates(batch):
        made = sorted(created)
        calls = [("create", {"words": op}) if isinstance(op, list) else
                 ("delete", {"id": made[op % len(made)] if made else "fuzz-none"}) for op in batch]
        assume(not any(any(map(answering_peer, create_peers(p.get("words", [])))) for m, p in calls))
        send(calls)

    @settings(FUZZ, max_examples=800)
    @given(st.lists(method_calls(ns.name), min_size=1, max_size=4))
    def methods(calls):
        for method, params in calls:
            if isinstance(params, dict):
                words = params.get("words")
                peers = [params.get("host"), *(create_peers(words) if isinstance(words, list) else [])]
                assume(not any(isinstance(p, str) and answering_peer(p) for p in peers))
        send(calls)

    @settings(FUZZ, max_examples=500)
    @given(st.lists(raw_lines(), min_size=1, max_size=4))
    def raw(chunks):
        data = b"".join(chunks)
        replies = ch.exchange(data, data.count(b"\n"))
        settle([(None, None)] * len(replies), replies)

    creates()
    methods()
    raw()
    print("answers:", dict(sorted(seen.items())), f"{len(created)} wormholes made", sep="\n")

    # at and over the line limit, deep nesting, a line written in pieces
    [at, over] = ch.exchange(sized_echo(MAX_LINE, "a") + b"\n" + sized_echo(MAX_LINE + 1, "a") + b"\n", 2)
    assert check_reply(at, "big")["result"] == json.loads(sized_echo(MAX_LINE, "a"))["params"]
    assert check_reply(over)["error"]["code"] == protocol.INVALID_REQUEST
    [deep] = ch.exchange(b"[" * 100_000 + b"\n", 1)
    assert check_reply(deep)["error"]["code"] == protocol.PARSE_ERROR
    line = request(7, "echo", {"in": "pieces"})
    for i in range(0, len(line) - 1, 5):
        assert ch.exchange(line[i:i + 5], 0) == []
    assert check_reply(ch.exchange(line[-1:], 1)[0], 7)["result"] == {"in": "pieces"}

    # the same daemon still answers, on this connection and on new ones
    assert ch.call("echo", {"still": "here"})["result"] == {"still": "here"}
    host.ok("ping")

    # nothing half-created: every wormhole listed belongs to a create that succeeded
    rows = ch.call("list", {})["result"]
    belongs = roots(rows)
    assert {r["id"]: belongs[r["id"]] for r in rows if belongs[r["id"]] not in created} == {}, rows
    missing = {ident: created[ident] for ident in set(created) - set(belongs.values())}
    assert not missing, f"created, not deleted, and not listed: {missing}"
    assert all(r["state"] in ("armed", "active") for r in rows), rows
    for ident in list(created):
        reply = ch.call("delete", {"id": ident})
        assert "result" in reply, reply
    assert ch.call("list", {})["result"] == []
    assert ch.call("tunnel-list", {})["result"] == []
    assert {"host": listening(host), "ns": listening(ns)} == before, "something still listens"
    assert host.leftovers() == []
    ch.close()
    assert "Traceback" not in host.logs()


# --- known bugs, found by the fuzz ---------------------------------------------------------


def logged_after(host, *calls: tuple[str, dict]) -> tuple[list[dict], str]:
    """Requests on a fresh channel: (their replies, what the daemon logged meanwhile)."""
    log = LogWatch(host.log)
    log.new()
    ch = channel(host)
    try:
        replies = [ch.call(method, params) for method, params in calls]
    finally:
        ch.close()
    return replies, log.new()


@pytest.mark.parametrize("method,params", [
    pytest.param("create", {"words": ["url", ":²"]}, id="create-superscript-port"),
    pytest.param("ping", {"host": "192.0.2.1:²"}, id="ping-superscript-port"),
    pytest.param("tunnel-delete", {"host": "192.0.2.1:²"}, id="tunnel-delete-superscript-port"),
    pytest.param("create", {"words": ["url", "[::1%\x00]:20000"]}, id="create-nul-in-scope-id"),
])
def test_refused_without_a_traceback(host, method, params):
    """What the fuzz found answered -32002 with a traceback: digit characters that are not
    ASCII ('²') in a port, a NUL in an IPv6 zone."""
    [reply], logged = logged_after(host, (method, params))
    assert "Traceback" not in logged, logged
    assert reply["error"]["code"] == protocol.REFUSED
    assert host.list() == []


def test_a_child_with_an_unsafe_id_is_refused(host):
    """`child` took any id and built the wormhole, which then could never be deleted (its id
    is no record name): ids and owners are checked first."""
    replies, logged = logged_after(host, ("child", {"words": ["url", ":20000", "tail", "url", ":20001"], "id": "é",
                                                    "owner": "o"}),
                                   ("delete", {"id": "é.o"}))
    assert "Traceback" not in logged, logged
    assert replies[0]["error"]["code"] == protocol.INVALID_PARAMS and "bad id 'é'" in replies[0]["error"]["message"]
    assert host.list() == [] and not host.listening(20000)
