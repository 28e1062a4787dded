"""Fuzzing what comes from users and from the wire: create's words, JSON-RPC lines, addresses.

Properties: `plan(parse(words))` gives a Plan or raises SpecError with a one-line
message; `protocol.parse_request(line)` gives a Request or raises RpcError with a
JSON-RPC code (and both answers encode); `Address.parse(text)` gives an Address or
raises AddressError. Never another exception (RecursionError, IndexError, TypeError,
a bare ValueError...).

The strategies for create's words are built by `create_words(...)`, which
functional_tests/test_fuzz_daemon.py also uses (with ports and peers a live daemon
can take). The bugs the fuzz found are regression tests at the end.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wormhole import protocol
from wormhole.addr import Address, AddressError
from wormhole.protocol import MAX_LINE, MAX_NESTING, Oversize, Request, RpcError
from wormhole.spec import (ARITY, MAX_LINKS, MAX_WORD_LENGTH, MAX_WORDS, PROTOS, Context, Plan,
                           SpecError, Url, parse, plan)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL_WORDS = tuple(ARITY)
RPC_CODES = {protocol.PARSE_ERROR, protocol.INVALID_REQUEST, protocol.INVALID_PARAMS}

# --- strategies: the pieces of create's words ------------------------------------------

ODD_PORTS = ("", "0", "65535", "65536", "00080", "+80", "-1", " 80", "80 ", "8_0", "0x50", "1e3", "٣٣",
             "9" * 40, "9" * (MAX_WORD_LENGTH - 1), "²", "①")
ODD_HOSTS = ("", "::", "::1", "1.2.3", "999.1.1.1", "[1.2.3.4]", "[fe80::1%eth0]", "[::1%\x00]", "[]", "[", "]",
             "[::1]x", "..", "-a", "a..b", "a.", "1" * 300, "é.example", "a" * 64, "a@b", "::ffff:1.2.3.4",
             "[::ffff:127.0.0.1]", "a\nb", "a\u2028b", "a b")
ODD_NAMES = ("", ".", "..", "a/b", "a" * 129, "docker:", "x@y", "-x", "é", "a b", "\n", "a\x00")
GOOD_DOCKER_OPTS = ("--rm", "-d", "--name=fuzz", "-e A=1", "--env=B", "-v /a:/b:ro", "-w /", "-u 0", "-l k=v",
                    "--entrypoint=/bin/sh")
ODD_DOCKER_OPTS = ("--name", "-e", "-v", "--privileged", "-p", "--rm=1", "-", "--", "'", '"', "\\", "a'b", ":",
                   "/a", "--volume=/a:")
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
HOSTNAMES = st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,15}){0,3}\.?", fullmatch=True)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
# hostile text: unicode, control characters, bytes; and words around the length limit
HOSTILE = st.one_of(st.text(max_size=20), st.binary(max_size=20).map(lambda b: b.decode("latin-1")))
LONG = st.builds(lambda c, n: c * n, st.characters(), st.integers(MAX_WORD_LENGTH - 1, MAX_WORD_LENGTH + 1))


def good_hosts(v4: st.SearchStrategy[str] = IPV4, names: st.SearchStrategy[str] = HOSTNAMES) -> st.SearchStrategy[str]:
    """Hosts as a URL writes them: IPv4, [IPv6], names, the wildcards and loopbacks."""
    return st.one_of(v4, IPV6.map(lambda a: f"[{a}]"), names,
                     st.sampled_from(("127.0.0.1", "0.0.0.0", "[::1]", "[::]", "localhost")))


def _url(proto, place, host, port) -> str:
    return "".join((f"{proto}://" if proto is not None else "", f"{place}@" if place is not None else "",
                    host or "", f":{port}" if port is not None else ""))


# the argument of a word (None in word_args) added since these strategies were written:
# numbers and durations (as max-conns and idle-timeout take), and odd ones
OTHER_ARG = st.builds(lambda n, unit: f"{n}{unit}", st.integers(1, 1000), st.sampled_from(("", "s", "ms")))
ODD_OTHER_ARG = st.builds(lambda n, unit: f"{n}{unit}", st.integers(-1, 10**9),
                          st.sampled_from(("", "s", "ms", "m", "h", "d", ".5s", "x", "²")))


def _mixed(good, odd) -> st.SearchStrategy[str]:
    """Mostly good text (that parses), else odd (plausible but wrong) or hostile text."""
    return st.one_of(good, good, good, odd, HOSTILE)


def word_args(*, ports: st.SearchStrategy[int] = st.integers(1, 65535), hosts=None, peers=None,
              names: st.SearchStrategy[str] = NAMES, places=None, images: st.SearchStrategy[str] = NAMES,
              hostile: bool = True) -> dict:
    """The argument strategy of each word that takes one. `ports`, `hosts`: those of URLs;
    `peers`: those of remote/tunnel/udptunnel (default: a host, with a port or not); `names`:
    of ids, containers and namespaces; `places`: the NS of URLs (default: a name or
    docker:NAME); `images`: of docker-run. Without `hostile`, only these (arguments that
    parse); with it, mostly these, and odd and hostile text besides."""
    hosts = hosts if hosts is not None else good_hosts()
    port = ports.map(str)
    peers = peers if peers is not None else st.one_of(hosts, st.builds(lambda h, p: f"{h}:{p}", hosts, port))
    places = places if places is not None else st.one_of(names, names.map(lambda n: f"docker:{n}"))
    url = st.builds(_url, st.sampled_from((None, None, "tcp", "udp")), st.none() | places, st.none() | hosts,
                    st.one_of(port, port, st.none()))  # a port first: what examples shrink towards
    docker_run = st.builds(lambda opts, image, cmd: " ".join((*opts, image, *cmd)),
                           st.lists(st.sampled_from(GOOD_DOCKER_OPTS), max_size=3), images,
                           st.lists(names, max_size=2))
    args = {"url": url, "id": names, "docker-ns": names, "docker-run": docker_run,
            "remote": peers, "tunnel": peers, "udptunnel": peers, None: OTHER_ARG}
    if not hostile:
        return args
    odd_port = st.one_of(st.integers(-10, 200_000).map(str), st.sampled_from(ODD_PORTS),
                         st.text(alphabet="0123456789:+- x", max_size=8),
                         st.text(alphabet=st.characters(categories=("Nd", "No")), min_size=1, max_size=4))
    odd_host = st.one_of(st.sampled_from(ODD_HOSTS), IPV6, st.text(max_size=10))
    odd_name = st.one_of(st.sampled_from(ODD_NAMES), st.text(max_size=8))
    odd_peer = st.one_of(odd_host, st.builds(lambda h, p: f"{h}:{p}", hosts | odd_host, odd_port))
    odd = {"url": st.builds(_url, st.sampled_from((None, "tcp", "udp", "sctp", "", "TCP")),
                            st.none() | places | odd_name, st.none() | hosts | odd_host, st.none() | port | odd_port),
           "id": odd_name, "docker-ns": odd_name,
           "docker-run": st.lists(st.one_of(st.sampled_from(GOOD_DOCKER_OPTS + ODD_DOCKER_OPTS), images,
                                            st.text(max_size=8)), max_size=8).map(" ".join),
           "remote": odd_peer, "tunnel": odd_peer, "udptunnel": odd_peer, None: ODD_OTHER_ARG}
    return {word: _mixed(args[word], odd[word]) for word in args}


def _clause(args: dict, word: str) -> st.SearchStrategy[list[str]]:
    return args.get(word, args[None]).map(lambda a: [word, a]) if ARITY[word] else st.just([word])


def _flat(clauses) -> list[str]:
    return [w for clause in clauses for w in clause]


def create_words(args: dict, good: dict | None = None, *, words: tuple[str, ...] = REAL_WORDS,
                 max_clauses: int = 10, limits: bool = True) -> st.SearchStrategy[list[str]]:
    """Word lists of `words`: as the README writes them (`readme_like`), or well-formed clauses
    (a word and its argument) in any order, arguments from `good`, from `args`, also with
    stray words and random text mixed in; with `limits`, lists around MAX_WORDS, MAX_LINKS and
    MAX_WORD_LENGTH (a clause pattern repeated, chains, a long word) and pure random text."""
    good = good or args

    def clauses(args):
        return st.sampled_from(words).flatmap(lambda w: _clause(args, w))
    clause = clauses(args)
    stray = st.one_of(st.sampled_from(words), st.text(max_size=12)).map(lambda w: [w])
    readme = st.one_of(readme_like(good), readme_like(good), readme_like(args))
    valid = st.lists(clauses(good), min_size=1, max_size=max_clauses).map(_flat)
    clean = st.lists(clause, max_size=max_clauses).map(_flat)
    noisy = st.lists(st.one_of(clause, clause, clause, stray), max_size=max_clauses).map(_flat)
    if not limits:
        return st.one_of(readme, valid, clean, noisy)
    repeated = st.builds(lambda pattern, n: _flat(pattern) * n,
                         st.lists(clause, min_size=1, max_size=3), st.integers(1, MAX_WORDS // 2 + 20))
    long = st.builds(lambda ws, w, arg: [*ws, w, arg], clean, st.sampled_from([w for w in words if ARITY[w]]), LONG)
    random = st.lists(st.text(max_size=10), max_size=30)
    return st.one_of(readme, readme, valid, clean, noisy, repeated, chains(good), long, random)


def readme_like(args: dict) -> st.SearchStrategy[list[str]]:
    """[url HEAD] [id ID] [tail|trigger] [url TAIL], then up to three links, each followed by
    such words: child/chain, or remote/tunnel/udptunnel HOST (mostly after trigger, with no
    tail settings before it)."""
    def maybe(word, often=1):  # the first choice is the one hypothesis shrinks towards: the word
        return st.one_of(*[args[word].map(lambda a: [word, a])] * often, st.just([]))
    head = st.builds(lambda url, ident: url + ident, maybe("url", often=3), maybe("id"))
    tail = st.builds(lambda side, url: side + url, st.sampled_from((["tail"], ["trigger"], [])), maybe("url", often=2))
    before_remote = st.sampled_from((["trigger"], ["trigger"], []))
    link = {"local": st.sampled_from((["child"], ["chain"])),
            "remote": st.builds(lambda w, host: [w, host], st.sampled_from(("remote", "tunnel", "udptunnel")),
                                args["remote"])}

    def words(kinds):
        parts = [head]
        for kind in kinds:
            parts += [before_remote if kind == "remote" else tail, link[kind], head]
        return st.tuples(*parts, tail).map(_flat)
    return st.lists(st.sampled_from(("local", "local", "remote")), max_size=3).flatmap(words)


def chains(args: dict) -> st.SearchStrategy[list[str]]:
    """A head, then n `chain|child tail url URL` links: plannable up to MAX_LINKS, refused past it."""
    link = st.tuples(st.sampled_from(("chain", "child")), args["url"]).map(lambda t: [t[0], "tail", "url", t[1]])
    return st.builds(lambda head, links: ["url", head, *_flat(links)],
                     args["url"], st.lists(link, min_size=MAX_LINKS - 1, max_size=MAX_LINKS + 2))


# --- create's words -----------------------------------------------------------------------


def check_create(words: list[str], *, child: bool = False, ctx: Context = Context()) -> None:
    try:
        result = plan(parse(words, child=child), ctx)
    except SpecError as e:
        message = str(e)
        if len(message.splitlines()) != 1:
            raise AssertionError(f"not one line: {message!r}") from None
    else:
        assert isinstance(result, Plan)
        ids = result.chain_ids("root")
        assert len(ids) == len(list(result.chain())) <= MAX_LINKS + 1


CONTEXTS = st.builds(Context, service_port=st.none() | st.integers(1, 65535), head_proto=st.sampled_from(PROTOS),
                     head_host=st.sampled_from((None, "127.0.0.1", "::1", "100.64.0.1")),
                     head_port=st.none() | st.integers(1, 65535))


@FUZZ
@given(create_words(word_args(), word_args(hostile=False)))
@example(["url", ":8000", "tail", "url", ":7000"])
@example(["url", ":" + "9" * (MAX_WORD_LENGTH - 1)])
@example(["child"] * (MAX_LINKS + 1))
@example(["chain"] * MAX_LINKS)
@example(["tail"] * MAX_WORDS)
@example(["tail"] * (MAX_WORDS + 1))
@example(["id", "a" * (MAX_WORD_LENGTH + 1)])
@example(["url", "[" * MAX_WORD_LENGTH])
@example(["docker-run", "'" * 10])
@example(["remote"])
@example([""])
@example([])
def test_create_words_plan_or_spec_error(words):
    check_create(words)


@FUZZ
@given(create_words(word_args(), word_args(hostile=False), max_clauses=6, limits=False), CONTEXTS)
def test_remote_child_words_plan_or_spec_error(words, ctx):
    """What a daemon does with a caller's `child` words: parse(child=True), its context."""
    check_create(words, child=True, ctx=ctx)


@FUZZ
@given(word_args()["url"])
def test_url_parse_round_trips_or_spec_error(text):
    try:
        url = Url.parse(text)
    except SpecError:
        return
    assert Url.parse(str(url)) == url


# --- JSON-RPC lines -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30)
RPC_METHODS = ("echo", "ping", "create", "delete", "list", "child", "tunnel-create", "tunnel-delete", "tunnel-list",
               "tunnel-hello", "tunnel-build", "tunnel-destroy")  # wormholed's (api.py)
METHODS = st.one_of(st.sampled_from(RPC_METHODS), st.text(max_size=12), JSON)


_ABSENT = object()  # a member left out of the message


def _message(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v is not _ABSENT}


MESSAGES = st.builds(_message, st.fixed_dictionaries({
    "jsonrpc": st.sampled_from(("2.0", "2.0", "2.0", "1.0", 2.0, None, _ABSENT)),
    "id": st.one_of(st.integers(), st.text(max_size=6), st.none(), JSON, st.just(_ABSENT)),
    "method": st.one_of(METHODS, st.just(_ABSENT)),
    "params": st.one_of(st.dictionaries(st.text(max_size=8), JSON, max_size=4), JSON, st.just(_ABSENT)),
}))


def nested(depth: int, opener: str = "[", closer: str = "]", core: str = "0") -> str:
    return opener * depth + core + closer * depth


def deep_json() -> st.SearchStrategy[str]:
    """JSON (valid, or cut short) nested around MAX_NESTING and far deeper, as a whole line or
    as a request's params."""
    depth = st.one_of(st.integers(0, MAX_NESTING + 3), st.integers(0, 20_000))
    arrays = st.builds(nested, depth)
    objects = st.builds(lambda d: nested(d, '{"a":', "}"), depth)
    mixed = st.builds(lambda d: '{"a":[' * d + "1" + "]}" * d, depth)
    in_string = st.builds(lambda d: json.dumps("[" * d), depth)
    body = st.one_of(arrays, objects, mixed, in_string)
    as_params = body.map(lambda b: f'{{"jsonrpc":"2.0","id":1,"method":"echo","params":{{"x":{b}}}}}')
    cut = st.builds(lambda text, at: text[:at], st.one_of(body, as_params), st.integers(0, 200))
    return st.one_of(body, as_params, cut)


def lines() -> st.SearchStrategy[bytes]:
    """Random bytes, JSON requests (well-formed or not, also in UTF-16/32), deep nesting."""
    text = st.one_of(MESSAGES.map(json.dumps), JSON.map(json.dumps), deep_json(), st.text(max_size=40))
    encoded = st.builds(lambda t, enc: t.encode(enc, "surrogatepass"), text,
                        st.sampled_from(("utf-8", "utf-8", "utf-8", "utf-16", "utf-16-le", "utf-32")))
    mutated = st.builds(lambda b, at, junk: b[:at] + junk + b[at:], encoded, st.integers(0, 100), st.binary(max_size=3))
    return st.one_of(st.binary(max_size=100), encoded, encoded, mutated)


def depth_of(value) -> int:
    """How deep lists and dicts nest in a parsed JSON value (iteratively: it may be deep)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            todo.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def check_line(line: bytes | Oversize) -> None:
    """As the daemon's control server answers a line: parse it, then encode the answer."""
    try:
        req = protocol.parse_request(line)
    except RpcError as e:
        assert e.code in RPC_CODES, e.code
        assert e.data is None or isinstance(e.data, dict)
        assert "\n" not in e.message
        answer = protocol.error((e.data or {}).get("id"), e)
    else:
        assert isinstance(req, Request) and isinstance(req.method, str) and isinstance(req.params, dict)
        assert max(depth_of(req.params), depth_of(req.id)) < MAX_NESTING, "the nesting limit holds"
        answer = protocol.result(req.id, req.params)  # what `echo` sends back
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1


@FUZZ
@given(lines())
@example(b"")
@example(b"[" * 100_000)
@example(b"{" * 100_000)
@example(b'{"a":' * 50_000)
@example(nested(MAX_NESTING).encode())
@example(nested(MAX_NESTING + 1).encode())
@example(json.dumps("[" * 100_000).encode())
@example(b"\xff\xfe" + "[".encode("utf-16-le") * 50_000)
@example(b'{"jsonrpc":"2.0","id":1,"method":"echo","params":' + nested(MAX_NESTING - 2).encode() + b"}")
@example(b'{"jsonrpc":"2.0","id":1e999,"method":"echo"}')
@example(b'{"jsonrpc":"2.0","id":NaN,"method":"echo","params":{"a":-Infinity}}')
@example(b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"echo"}')
@example(b'{"jsonrpc":"2.0","id":1,"method":"\\ud800","params":{"\\udfff":"\\ud800"}}')
@example(b'{"jsonrpc":"2.0","jsonrpc":"2.0","method":"a","method":[]}')
def test_parse_request_request_or_rpc_error(line):
    check_line(line)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 4 * MAX_LINE))
def test_oversize_lines_are_rpc_errors(length):
    check_line(Oversize(length))


def test_a_line_at_the_size_limit_parses():
    """A request of exactly MAX_LINE bytes is read as any other (and one over, by the framer,
    is an Oversize: test_protocol)."""
    head, tail = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"x":"', b'"}}'
    check_line(head + b"a" * (MAX_LINE - len(head) - len(tail)) + tail)
    check_line(b"[" * MAX_LINE)


# --- addresses ------------------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.text(max_size=30),
    st.builds(lambda scheme, peer: f"{scheme}{peer}",
              st.sampled_from(("", "tcp://", "unix://", "udp://", "unix:///", "tcp:/")), word_args()["remote"]),
    HOSTILE,
)


@FUZZ
@given(ADDRESSES)
@example("unix://")
@example("unix://\x00")
@example("tcp://")
@example(":" + "9" * 4300)
def test_address_parse_or_address_error(text):
    try:
        addr = Address.parse(text)
    except AddressError as e:
        assert str(e)
    else:
        assert addr.kind in ("tcp", "unix")
        assert addr.kind == "unix" or 0 < addr.port < 65536


# --- bugs the fuzz found, as regression tests ------------------------------------------

BAD_PORT_DIGITS = ["²", "①", "1²", "9" * 4301]


@pytest.mark.parametrize("words", [["url", f":{port}"] for port in BAD_PORT_DIGITS] + [["max-conns", "²"]])
def test_digit_characters_are_a_spec_error(words):
    """str.isdigit() takes '²' and '①', which int() refuses: ports and counts are ASCII digits."""
    with pytest.raises(SpecError, match="bad|the limit is"):
        plan(parse(words))


@pytest.mark.parametrize("port", BAD_PORT_DIGITS)
def test_address_port_of_digit_characters_is_an_address_error(port):
    with pytest.raises(AddressError):
        Address.parse(f"127.0.0.1:{port}")


def test_tail_before_remote_message_is_one_line():
    """The remote host is checked before a message names it."""
    with pytest.raises(SpecError) as e:
        parse(["tail", "url", ":1", "remote", "a\nb"])
    assert "\n" not in str(e.value)


def test_nesting_limit_holds_in_utf16():
    """A line is UTF-8: in UTF-16 (which json.loads would take from bytes) a character such as
    U+2200 (bytes 00 22) looked like a quote to the nesting scan, and the brackets after it
    were not counted (fixed in 55f34a5)."""
    deep = nested(MAX_NESTING + 8)
    text = '{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":"\u2200","b":' + deep + "}}"
    with pytest.raises(RpcError) as e:
        protocol.parse_request(text.encode("utf-16-le"))
    assert e.value.code == protocol.PARSE_ERROR
