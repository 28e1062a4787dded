"""The `create` grammar: words -> a frozen SegmentSpec chain -> a resolved Plan.

Pure: no sockets, no namespaces, no daemon. `parse` reads the words left to
right (modifiers apply to the head until `tail` or `trigger`; a chain word
starts a child); `plan` applies the defaults (proto, host, service port,
inherited namespaces) and the rules that make a spec unbuildable (a tail with
no port, a wormhole that proxies to itself). The daemon builds what the Plan
says; a remote daemon re-plans the words of its part with the context the
caller gives it. The ids a wormhole's children get are decided here too, so
that the daemon can reserve them before it builds anything.

A child hangs off its parent by a `Link`, which says two independent things:
*where* the child lives (`child`, `chain`: this daemon; `remote`: another
daemon) and *how its bytes travel* to it (`direct`, or through an encrypted
`tunnel`/`udptunnel` to that daemon). The words map onto the pairs:

    child -> (child, direct)      chain -> (chain, direct)
    remote -> (remote, direct)    tunnel -> (remote, tunnel)    udptunnel -> (remote, udptunnel)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass

from .docker_args import RunArgsError, parse_run_args

PROTOS = ("tcp", "udp")  # what a head another daemon dials may speak
URL_PROTOS = PROTOS + ("unix",)
STREAM = ("tcp", "unix")  # protocols a stream relay joins: a tcp head may have a unix tail and back
BALANCE = ("round-robin", "least-conns")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, the last a NUL (an abstract name: its @ stands for a NUL)
DEFAULT_MODE = 0o660  # a unix head socket's permissions unless `mode` says otherwise
# chain word -> (where the child lives, how its bytes travel)
LINK_WORDS = {
    "child": ("child", "direct"), "chain": ("chain", "direct"), "remote": ("remote", "direct"),
    "tunnel": ("remote", "tunnel"), "udptunnel": ("remote", "udptunnel"),
}
# word -> number of arguments it takes
ARITY = {
    "url": 1, "id": 1, "docker-ns": 1, "docker-run": 1, "k8s-ns": 1, "tail": 0, "trigger": 0,
    "child": 0, "chain": 0, "remote": 1, "tunnel": 1, "udptunnel": 1,
    "max-conns": 1, "idle-timeout": 1, "mode": 1, "add-tail": 0, "balance": 1,
}
MAX_CONNS_LIMIT = 1 << 20  # max-conns above this is surely a typo
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() takes '²' and Arabic-Indic digits
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an IPv6 zone: an interface name or index
_MODE = re.compile(r"0?[0-7]{3}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}
# Limits on what one create may say (documented in `help create` and the README): far
# above any real chain, low enough that parsing and planning (recursive, one level per
# linked wormhole) stay cheap and never reach Python's recursion limit.
MAX_WORDS = 256
MAX_WORD_LENGTH = 4096
MAX_LINKS = 16  # child/chain/remote/tunnel/udptunnel words in one create
MAX_TAILS = 64  # tails of one wormhole (add-tail)
LINK_ARITY_WORDS = ("child", "chain", "remote", "tunnel", "udptunnel")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
WILDCARDS = ("0.0.0.0", "::")


class SpecError(ValueError):
    """The words asked for something wrong; the message is fit for the user."""


def hostport(host: str, port: int | str) -> str:
    """host:port as a user writes it: [v6]:port for IPv6. The one formatter of addresses."""
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# --- values the user wrote -------------------------------------------------


def parse_port(text: str, what: str) -> int:
    if not _DIGITS.fullmatch(text) or not 0 < int(text) < 65536:
        raise SpecError(f"bad port {text!r} in {what}: ports are 1-65535")
    return int(text)


def parse_count(text: str, what: str) -> int:
    """A positive count such as max-conns' (at most MAX_CONNS_LIMIT)."""
    if not _DIGITS.fullmatch(text) or not 0 < int(text) <= MAX_CONNS_LIMIT:
        raise SpecError(f"bad {what} {text!r}: a whole number from 1 to {MAX_CONNS_LIMIT}")
    return int(text)


def parse_duration(text: str, what: str) -> float:
    """Seconds from '30', '30s', '500ms', '5m', '1h' (more than 0, at most a week)."""
    m = _DURATION.fullmatch(text)
    seconds = float(m.group(1)) * _UNIT[m.group(2)] if m else 0.0
    if not 0 < seconds <= 7 * 86400:
        raise SpecError(f"bad {what} {text!r}: a duration such as 30s, 500ms, 5m or 1h (at most a week)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest way create's words would say it: 1h, 5m, 30s, 500ms, 1.5s."""
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def parse_host(text: str, what: str) -> str:
    """A host as the user wrote it: IPv4, bracket-less IPv6, or a DNS name."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(text) and not text.replace(".", "").isdigit():
        return text
    raise SpecError(f"bad host {text!r} in {what}")


def split_host_port(text: str, what: str) -> tuple[str | None, int | None]:
    """'host', 'host:port', ':port', '[v6]', '[v6]:port', '' -> (host, port)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SpecError(f"bad address {text!r} in {what}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise SpecError(f"bad IPv6 address {text[: end + 1]!r} in {what}") from None
        if "%" in host and not _SCOPE.fullmatch(host.partition("%")[2]):
            raise SpecError(f"bad IPv6 zone in {text[: end + 1]!r} in {what}: an interface name or index")
        if rest and not rest.startswith(":"):
            raise SpecError(f"bad address {text!r} in {what}")
        return host, parse_port(rest[1:], what) if rest else None
    if text.count(":") > 1:
        raise SpecError(f"bad address {text!r} in {what}: write IPv6 addresses as [addr]:port")
    host, sep, port = text.partition(":")
    return (parse_host(host, what) if host else None), (parse_port(port, what) if sep else None)


def check_name(text: str, what: str) -> str:
    if not _NAME.fullmatch(text) or text in (".", ".."):
        raise SpecError(f"bad {what} {text!r}: use letters, digits and _.:- (at most 128)")
    return text


@dataclass(frozen=True)
class Place:
    """Which network namespace an end lives in."""

    kind: str  # "host" (the daemon's own), "netns", "docker-ns", "docker-run", "k8s-ns" (arg NAMESPACE/POD)
    arg: str = ""

    @property
    def prefix(self) -> str | None:
        """How a URL names this place (`NAME@`, `docker:NAME@`); None: a URL cannot
        (a container still to be started)."""
        return {"host": "", "netns": f"{self.arg}@", "docker-ns": f"docker:{self.arg}@",
                "k8s-ns": f"k8s:{self.arg}@"}.get(self.kind)

    def __str__(self) -> str:
        """As create's words would say it."""
        return {"host": "the daemon's namespace", "netns": f"netns {self.arg}",
                "docker-ns": f"docker-ns {self.arg}", "docker-run": f'docker-run "{self.arg}"',
                "k8s-ns": f"k8s-ns {self.arg}"}[self.kind]


HOST = Place("host")
DOCKER_PREFIX = "docker:"
K8S_PREFIX = "k8s:"
_K8S_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label
_K8S_POD = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a DNS-1123 subdomain


def check_pod(text: str) -> str:
    """NAMESPACE/POD as Kubernetes names them."""
    namespace, sep, pod = text.partition("/")
    if not sep or not _K8S_NAMESPACE.fullmatch(namespace) or not _K8S_POD.fullmatch(pod):
        raise SpecError(f"bad pod {text!r}: write NAMESPACE/POD (lowercase letters, digits, '-', and '.' in the pod's name)")
    return text


@dataclass(frozen=True)
class Url:
    """`[tcp|udp://][NS@|docker:CONTAINER@][HOST][:PORT]`; a field left out is None (not given).
    A unix socket: `unix://[NS@]/PATH` (a file) or `unix:[NS@]@NAME` (the abstract namespace).

    `docker:NAME@` is the namespace of a running container (as `docker-ns NAME`): it lets
    the URLs that `create` and `list` print be read back by `url`. A unix socket's file is
    looked up in the filesystem of the place's container (docker-ns), else the host's; an
    abstract name belongs to the place's network namespace."""

    proto: str | None = None
    place: Place | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None  # unix: "/file" or "@abstract"

    @classmethod
    def parse(cls, text: str) -> Url:
        what = f"url {text!r}"
        if text.startswith("unix:"):
            return cls._parse_unix(text[len("unix:"):], what)
        proto = None
        if "://" in text:
            proto, _, text = text.partition("://")
            if proto not in PROTOS:
                raise SpecError(f"bad protocol {proto!r} in {what}: use tcp or udp")
        place = None
        if "@" in text:
            name, _, text = text.partition("@")
            place = _place_named(name)
        host, port = split_host_port(text, what)
        return cls(proto, place, host, port)

    @classmethod
    def _parse_unix(cls, rest: str, what: str) -> Url:
        """After `unix:`: `//[NS@]/PATH` or `[NS@]@NAME`."""
        place = None
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                name, sep, rest = rest.partition("@")
                if not sep:
                    raise SpecError(f"bad {what}: a unix socket's path is absolute (unix:///run/app.sock)")
                place = _place_named(name)
            if not rest.startswith("/"):
                raise SpecError(f"bad {what}: a unix socket's path is absolute (unix:///run/app.sock)")
        elif not rest.startswith("@"):
            name, sep, rest = rest.partition("@")
            if not sep:
                raise SpecError(f"bad {what}: write unix:///PATH or unix:@NAME (abstract)")
            place = _place_named(name)
        return cls("unix", place, path=check_unix_path(rest, what))

    def __str__(self) -> str:
        if self.proto == "unix":
            return unix_url(self.place, self.path)
        host = f"[{self.host}]" if self.host and ":" in self.host else (self.host or "")
        return "".join((
            f"{self.proto}://" if self.proto else "",
            self.place.prefix or "" if self.place else "",
            host,
            f":{self.port}" if self.port is not None else "",
        ))


def _place_named(name: str) -> Place:
    """The place a URL's `NS@` or `docker:NAME@` names."""
    if name.startswith(DOCKER_PREFIX):
        return Place("docker-ns", check_name(name[len(DOCKER_PREFIX):], "container"))
    if name.startswith(K8S_PREFIX):
        return Place("k8s-ns", check_pod(name[len(K8S_PREFIX):]))
    return Place("netns", check_name(name, "namespace name"))


def check_unix_path(path: str, what: str) -> str:
    """A unix socket's file path (absolute, no NUL) or `@NAME` (abstract), short enough to bind."""
    if path in ("@", "/") or "\0" in path or path.endswith("/"):
        raise SpecError(f"bad unix socket {path!r} in {what}")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise SpecError(f"unix socket path too long in {what}: {len(path.encode())} bytes "
                        f"(at most {UNIX_PATH_MAX})")
    return path


def unix_url(place: Place | None, path: str) -> str:
    """unix:///PATH, unix://NS@/PATH, unix:@NAME, unix:NS@@NAME: what Url.parse reads back."""
    prefix = place.prefix or "" if place else ""
    return f"unix:{prefix}{path}" if path.startswith("@") else f"unix://{prefix}{path}"


def parse_mode(text: str) -> int:
    """A unix head socket's permissions: octal, 0660 or 660 (at most 0777)."""
    if not _MODE.fullmatch(text):
        raise SpecError(f"bad mode {text!r}: octal permissions such as 0660 or 0600")
    return int(text, 8)


@dataclass(frozen=True)
class EndSpec:
    """What the words said about one end; None = not given."""

    proto: str | None = None
    host: str | None = None
    port: int | None = None
    place: Place | None = None
    path: str | None = None  # a unix socket

    def with_url(self, url: Url) -> EndSpec:
        if url.proto == "unix":  # a socket file or name: no host, no port
            return dataclasses.replace(self, proto="unix", host=None, port=None, path=url.path,
                                       place=url.place or self.place)
        return dataclasses.replace(
            self,
            proto=url.proto or self.proto,
            host=url.host if url.host is not None else self.host,
            port=url.port if url.port is not None else self.port,
            place=url.place or self.place,
            path=None if url.proto else self.path,
        )

    @property
    def given(self) -> bool:
        return self != EndSpec()


@dataclass(frozen=True)
class Link:
    """How a wormhole's child hangs off it: where the child lives and how bytes reach it."""

    where: str  # "child", "chain" (this daemon) or "remote" (the daemon at `host`)
    transport: str  # "direct", "tunnel" or "udptunnel" (an encrypted tunnel to `host`)
    host: str | None  # remote: the peer daemon's address
    words: tuple[str, ...]  # the child's own words (what a remote daemon is sent)
    spec: SegmentSpec

    @property
    def word(self) -> str:
        """The chain word the user wrote."""
        return self.where if self.transport == "direct" else self.transport

    @property
    def linked(self) -> bool:
        """The parent's tail connects to this child's head."""
        return self.where != "child"

    @property
    def remote(self) -> bool:
        return self.where == "remote"

    @property
    def tunnelled(self) -> bool:
        return self.transport != "direct"


@dataclass(frozen=True)
class SegmentSpec:
    id: str | None = None
    head: EndSpec = EndSpec()
    tail: EndSpec = EndSpec()
    trigger: bool = False  # tail namespace and the child are made on the first connection
    child: Link | None = None
    max_conns: int | None = None  # None: the daemon's default
    idle_timeout: float | None = None  # seconds; None: the daemon's default
    mode: int | None = None  # a unix head socket's permissions; None: DEFAULT_MODE
    tails: tuple[EndSpec, ...] = ()  # more tails (`add-tail`): connections are spread over all
    balance: str | None = None  # how: round-robin (the default) or least-conns


# --- parsing -----------------------------------------------------------------


def parse(words: list[str] | tuple[str, ...], *, child: bool = False) -> SegmentSpec:
    """Read create's words left to right into a SegmentSpec chain.

    `child`: the words of a remote child, which may be none at all (`remote HOST`)."""
    words = tuple(words)
    if not words and not child:
        raise SpecError("nothing to create: give words such as 'url :8080 tail url :80'")
    check_limits(words)
    return _parse_segment(words, 0)


def check_limits(words: tuple[str, ...]) -> None:
    """Refuse a create longer than the documented limits, before any parsing."""
    if len(words) > MAX_WORDS:
        raise SpecError(f"too many words: {len(words)} (the limit is {MAX_WORDS})")
    for word in words:
        if len(word) > MAX_WORD_LENGTH:
            raise SpecError(f"a word of {len(word)} characters (the limit is {MAX_WORD_LENGTH})")
    links = sum(1 for w in words if w in LINK_ARITY_WORDS)
    if links > MAX_LINKS:
        raise SpecError(f"too many linked wormholes: {links} child/chain/remote/tunnel words "
                        f"(the limit is {MAX_LINKS})")


def _parse_segment(words: tuple[str, ...], i: int) -> SegmentSpec:
    fields: dict = {"id": None, "head": EndSpec(), "tail": EndSpec(), "trigger": False,
                    "max_conns": None, "idle_timeout": None, "mode": None, "balance": None}
    extra: list[EndSpec] = []  # add-tail's
    side: str | int = "head"  # or "tail", or an index into extra

    def end() -> EndSpec:
        return extra[side] if isinstance(side, int) else fields[side]

    def set_end(value: EndSpec) -> None:
        if isinstance(side, int):
            extra[side] = value
        else:
            fields[side] = value

    while i < len(words):
        word = words[i]
        if word not in ARITY:
            raise SpecError(f"unknown word {word!r}; words are: {', '.join(ARITY)}")
        if ARITY[word] and i + 1 >= len(words):
            raise SpecError(f"{word!r} needs an argument")
        arg = words[i + 1] if ARITY[word] else None
        i += 1 + ARITY[word]
        if word == "url":
            set_end(end().with_url(Url.parse(arg)))
        elif word == "id":
            if fields["id"] is not None:
                raise SpecError("'id' given twice for one wormhole")
            fields["id"] = check_name(arg, "id")
        elif word == "docker-ns":
            set_end(dataclasses.replace(end(), place=Place("docker-ns", check_name(arg, "container"))))
        elif word == "k8s-ns":
            set_end(dataclasses.replace(end(), place=Place("k8s-ns", check_pod(arg))))
        elif word == "docker-run":
            if not arg.strip():
                raise SpecError("'docker-run' needs the arguments of 'docker run' as one quoted word")
            try:
                parse_run_args(arg)
            except RunArgsError as e:
                raise SpecError(str(e)) from None
            set_end(dataclasses.replace(end(), place=Place("docker-run", arg.strip())))
        elif word in ("max-conns", "idle-timeout"):
            key = word.replace("-", "_")
            if fields[key] is not None:
                raise SpecError(f"'{word}' given twice for one wormhole")
            fields[key] = parse_count(arg, word) if word == "max-conns" else parse_duration(arg, word)
        elif word == "mode":
            if side != "head":
                raise SpecError("'mode' sets the head socket's permissions: give it before 'tail'")
            if fields["mode"] is not None:
                raise SpecError("'mode' given twice for one wormhole")
            fields["mode"] = parse_mode(arg)
        elif word == "balance":
            if arg not in BALANCE:
                raise SpecError(f"bad balance {arg!r}: {' or '.join(BALANCE)}")
            if fields["balance"] is not None:
                raise SpecError("'balance' given twice for one wormhole")
            fields["balance"] = arg
        elif word == "add-tail":
            if len(extra) + 1 >= MAX_TAILS:
                raise SpecError(f"too many tails (the limit is {MAX_TAILS})")
            extra.append(EndSpec())
            side = len(extra) - 1
        elif word == "tail":
            side = "tail"
        elif word == "trigger":
            if fields["trigger"]:
                raise SpecError("'trigger' given twice for one wormhole")
            fields["trigger"], side = True, "tail"
        else:
            if isinstance(side, int) and LINK_WORDS[word][0] == "remote" and not extra[side].given:
                # `add-tail remote HOST ...`: the remote child is one of the tails. It is the
                # segment's main tail (its link's), the others follow it.
                extra.pop(side)
                if fields["tail"].given:
                    extra.insert(0, fields["tail"])
                fields["tail"] = EndSpec()
            return SegmentSpec(child=_parse_link(word, arg, fields, words, i), tails=tuple(extra), **fields)
    return SegmentSpec(tails=tuple(extra), **fields)


def _parse_link(word: str, host: str | None, fields: dict, words: tuple[str, ...], i: int) -> Link:
    where, transport = LINK_WORDS[word]
    if where == "remote":
        split_host_port(host, f"{word} {host!r}")  # first: the host is named in messages below
        if fields["tail"].given:
            raise SpecError(f"'{word}' makes the tail connect to the child on {host}: "
                            f"give tail settings after '{word} {host}'")
    # A child's head starts as a copy of this tail: `plan` fills what its words leave out.
    return Link(where, transport, host, words[i:], _parse_segment(words, i))


# --- planning ----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    proto: str
    place: Place
    host: str | None  # None: the address facing the caller (remote heads) / the remote child's head
    port: int | None  # None: ephemeral (heads) / the remote child's head (tails)
    path: str | None = None  # unix: a socket file, or @NAME in the abstract namespace

    @property
    def unix(self) -> bool:
        return self.proto == "unix"

    def __str__(self) -> str:
        """As create's words would say it: a URL, after `docker-run "ARGS"` for a container
        still to be started; `*` for what is known only once built."""
        if self.unix:
            if self.place.prefix is None:
                return f"{self.place} url {unix_url(None, self.path)}"
            return unix_url(self.place, self.path)
        url = f"{self.proto}://{hostport(self.host or '*', self.port if self.port is not None else '*')}"
        if self.place.prefix is None:
            return f"{self.place} url {url}"
        return url.replace("://", f"://{self.place.prefix}", 1)


@dataclass(frozen=True)
class Context:
    """What a wormhole inherits from where it hangs: defaults for its head."""

    service_port: int | None = None
    head_proto: str = "tcp"
    head_place: Place = HOST
    head_host: str | None = "127.0.0.1"  # None: the address facing the caller
    head_port: int | None = None  # None: ephemeral
    head_path: str | None = None  # a unix head (a chain's child listening where a unix tail pointed)
    dialled: bool = False  # another daemon dials the head (a remote child): not a unix socket


@dataclass(frozen=True)
class Plan:
    """One wormhole, resolved: what the daemon builds."""

    id: str | None
    head: Endpoint
    tail: Endpoint  # port None: the (remote) child's head, known once it is built
    trigger: bool
    service_port: int | None
    child: Plan | None  # a local child (child/chain); remote ones are planned by their daemon
    link: Link | None  # how the child hangs off this wormhole
    max_conns: int | None = None  # TCP connections (UDP flows) at once; None: the daemon's default
    idle_timeout: float | None = None  # seconds without bytes before a connection is closed
    mode: int = DEFAULT_MODE  # a unix head socket file's permissions
    tails: tuple[Endpoint, ...] = ()  # add-tail's: the tail and these share the connections
    balance: str = "round-robin"

    @property
    def all_tails(self) -> tuple[Endpoint, ...]:
        return (self.tail,) + self.tails

    @property
    def linked(self) -> bool:
        """The tail connects to the child's head."""
        return self.link is not None and self.link.linked

    def chain(self):
        plan: Plan | None = self
        while plan is not None:
            yield plan
            plan = plan.child

    def chain_ids(self, root_id: str) -> list[str]:
        """The ids this wormhole (named root_id) and its local children get: a child's own
        `id`, else its parent's id + ".1"."""
        ids = [root_id]
        for p in list(self.chain())[1:]:
            ids.append(p.id or f"{ids[-1]}.1")
        return ids

    def remote_child_id(self, own_id: str) -> str | None:
        """The id asked of the peer for a remote child (the peer adds its owner's tag)."""
        if self.link is None or not self.link.remote:
            return None
        return self.link.spec.id or f"{own_id}.1"


def plan(spec: SegmentSpec, ctx: Context = Context()) -> Plan:
    """Resolve the defaults and check the rules; raises SpecError."""
    name = f"wormhole {spec.id!r}" if spec.id else "the wormhole"
    head = _end(spec.head, _proto(spec.head, ctx.head_proto), spec.head.place or ctx.head_place,
                ctx.head_host, ctx.head_port, ctx.head_path, f"the head of {name}")
    if head.unix and ctx.dialled:
        raise SpecError(f"the head of {name} is dialled by another daemon: it cannot be a unix socket")
    service_port = head.port if head.port is not None else ctx.service_port
    tail_proto = "tcp" if head.unix else head.proto  # a unix head's tails are tcp unless they say unix

    def tail_of(end: EndSpec) -> Endpoint:
        return _end(end, _proto(end, tail_proto), end.place or HOST, "127.0.0.1", service_port, None,
                    f"a tail of {name}")

    tail = tail_of(spec.tail)
    link, child = spec.child, None
    if link is not None and link.remote:
        tail = dataclasses.replace(tail, proto=tail_proto, host=None, port=None, path=None)
    elif link is not None:
        child = plan(link.spec, Context(service_port, tail.proto, tail.place,
                                        "127.0.0.1" if tail.unix else tail.host, tail.port, tail.path))
        if link.linked:
            tail = child.head
    if tail.port is None and not tail.unix and not (link and link.linked):
        raise SpecError(f"{name} has a tail with no port: give " + ("" if head.unix else "a head port ('url :PORT') or ")
                        + "a tail port ('tail url :PORT')")
    tails = tuple(tail_of(end) for end in spec.tails)
    for extra in tails:
        if extra.port is None and not extra.unix:
            raise SpecError(f"{name} has a tail with no port: give a head port ('url :PORT') "
                            f"or the tail's ('add-tail url :PORT')")
    for t in (tail,) + tails:
        if not _joins(head.proto, t.proto):
            where = f"the child on {link.host}" if link and link.remote and t is tail else "its tail"
            raise SpecError(f"{name} speaks {head.proto} but {where} speaks {t.proto}")
    if link is not None and link.remote and link.spec.head.proto not in (None, tail_proto):
        raise SpecError(f"{name} speaks {head.proto} but the child on {link.host} speaks {link.spec.head.proto}")
    for t in (tail,) + tails:
        if _same_address(head, t):
            raise SpecError(f"{name} proxies to itself ({head})")
    if spec.mode is not None and (not head.unix or head.path.startswith("@")):
        raise SpecError(f"'mode' sets a unix head socket file's permissions; the head of {name} is {head}")
    return Plan(spec.id, head, tail, spec.trigger, service_port, child, link, spec.max_conns, spec.idle_timeout,
                DEFAULT_MODE if spec.mode is None else spec.mode, tails, spec.balance or "round-robin")


def _proto(end: EndSpec, inherited: str) -> str:
    """An end's protocol: its own, else what it inherits; but an end that gives a host or a
    port where it would inherit unix (a chain after a unix tail) is tcp."""
    if end.proto:
        return end.proto
    if inherited == "unix" and (end.host is not None or end.port is not None):
        return "tcp"
    return inherited


def _end(end: EndSpec, proto: str, place: Place, host: str | None, port: int | None, path: str | None,
         what: str) -> Endpoint:
    """An Endpoint from what the words said and the defaults."""
    if proto == "unix":
        if end.host is not None or end.port is not None:
            raise SpecError(f"{what} is a unix socket: it takes a path (unix:///PATH), not a host or port")
        return Endpoint("unix", place, None, None, end.path or path)
    return Endpoint(proto, place, end.host if end.host is not None else host,
                    end.port if end.port is not None else port)


def _joins(head: str, tail: str) -> bool:
    """A head speaking `head` can relay to a tail speaking `tail`: the same, or two streams."""
    return head == tail or (head in STREAM and tail in STREAM)


def _same_address(head: Endpoint, tail: Endpoint) -> bool:
    if head.unix or tail.unix:
        return head.path == tail.path and head.place == tail.place and head.place.kind != "docker-run"
    if head.port is None or tail.port is None or head.port != tail.port:
        return False
    if head.proto != tail.proto or head.place != tail.place or head.place.kind == "docker-run":
        return False
    return head.host == tail.host or head.host in WILDCARDS
