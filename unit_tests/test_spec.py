"""The create grammar: every word, every default, every error."""

import pytest

from wormhole.spec import HOST, Context, Place, SpecError, Url, parse, plan


def P(text, ctx=Context()):
    return plan(parse(text.split()), ctx)


def chain(text):
    return list(P(text).chain())


# --- url ---------------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    (":3306", Url(None, None, None, 3306)),
    ("tcp://:80", Url("tcp", None, None, 80)),
    ("udp://", Url("udp", None, None, None)),
    ("udp://ns1@10.0.0.1:53", Url("udp", Place("netns", "ns1"), "10.0.0.1", 53)),
    ("ns1@", Url(None, Place("netns", "ns1"), None, None)),
    ("tcp://docker:db_1@127.0.0.1:3306", Url("tcp", Place("docker-ns", "db_1"), "127.0.0.1", 3306)),
    ("1.2.3.4", Url(None, None, "1.2.3.4", None)),
    ("[::1]:8080", Url(None, None, "::1", 8080)),
    ("[2001:db8::2]", Url(None, None, "2001:db8::2", None)),
    ("db.example.com:5432", Url(None, None, "db.example.com", 5432)),
    ("", Url()),
])
def test_url_parse(text, expect):
    assert Url.parse(text) == expect


@pytest.mark.parametrize("text,msg", [
    (":0", "ports are 1-65535"), (":65536", "ports are 1-65535"), (":http", "bad port"),
    (":-1", "bad port"), ("sctp://:1", "use tcp or udp"), ("[::1", "missing ']'"),
    ("::1:80", r"write IPv6 addresses as \[addr\]:port"), ("[1.2.3.4]:80", "bad IPv6"),
    ("a/b@:80", "namespace name"), ("..@:80", "namespace name"), ("bad_host!:80", "bad host"),
    ("[::1]x", "bad address"), ("999.1.1.1:80", "bad host"),
])
def test_url_errors(text, msg):
    with pytest.raises(SpecError, match=msg):
        Url.parse(text)


def test_url_round_trips_through_str():
    for text in ("udp://ns1@10.0.0.1:53", "tcp://[::1]:80", ":3306", "ns@"):
        assert Url.parse(str(Url.parse(text))) == Url.parse(text)


# --- defaults ----------------------------------------------------------------

def test_head_defaults_tcp_loopback_given_port():
    p = P("url :3306 tail url :3307")
    assert (p.head.proto, p.head.host, p.head.port, p.head.place) == ("tcp", "127.0.0.1", 3306, HOST)


def test_head_port_ephemeral_when_not_given():
    assert P("tail url :80").head.port is None


def test_tail_defaults_follow_head_proto_loopback_service_port():
    p = P("url udp://ns1@:53")
    assert (p.tail.proto, p.tail.host, p.tail.port, p.tail.place) == ("udp", "127.0.0.1", 53, HOST)
    assert p.head.place == Place("netns", "ns1")


def test_tail_url_overrides_only_what_it_gives():
    p = P("url :80 tail url 10.1.1.1")
    assert (p.tail.host, p.tail.port) == ("10.1.1.1", 80)
    p = P("url :80 tail url 10.1.1.1 url :81")
    assert (p.tail.host, p.tail.port) == ("10.1.1.1", 81)


def test_tail_with_no_port_is_refused():
    with pytest.raises(SpecError, match="tail with no port"):
        P("url 127.0.0.1")
    with pytest.raises(SpecError, match="tail with no port"):
        P("tail")


def test_proxy_to_itself_is_refused():
    for text in ("url :80", "url :80 tail url 127.0.0.1:80", "url 0.0.0.0:80",
                 "url ns1@:80 tail url ns1@:80", "url :80 docker-ns a tail docker-ns a"):
        with pytest.raises(SpecError, match="proxies to itself"):
            P(text)


def test_not_itself_when_namespace_host_port_or_proto_differ():
    P("url ns1@:80")
    P("url :80 tail url ns1@")
    P("url :80 tail url 10.0.0.1")
    P("url :80 tail url :81")
    P("url :80 docker-run img tail docker-run img")  # two containers


def test_mixed_protocols_are_refused():
    with pytest.raises(SpecError, match="speaks udp but its tail speaks tcp"):
        P("url udp://:53 tail url tcp://:54")


# --- words -------------------------------------------------------------------

def test_id_names_the_wormhole_and_twice_is_an_error():
    assert P("id web url :80 tail url :81").id == "web"
    with pytest.raises(SpecError, match="'id' given twice"):
        P("id a id b url :80 tail url :81")
    with pytest.raises(SpecError, match="bad id"):
        P("id a/b url :80 tail url :81")


def test_docker_ns_and_docker_run_set_the_place_of_the_current_side():
    p = P("url :3306 docker-ns app tail docker-ns mysql")
    assert p.head.place == Place("docker-ns", "app") and p.tail.place == Place("docker-ns", "mysql")
    p = plan(parse(["url", ":80", "tail", "docker-run", "-e A=1 img cmd"]))
    assert p.tail.place == Place("docker-run", "-e A=1 img cmd")
    with pytest.raises(SpecError, match="docker run"):
        plan(parse(["url", ":80", "tail", "docker-run", "  "]))


def test_trigger_switches_to_tail_and_defers():
    p = P("url :80 trigger url :8080")
    assert p.trigger and p.tail.port == 8080 and p.head.port == 80
    assert not P("url :80 tail url :8080").trigger
    with pytest.raises(SpecError, match="'trigger' given twice"):
        P("url :80 trigger trigger")


def test_unknown_word_and_missing_argument():
    with pytest.raises(SpecError, match="unknown word 'frob'"):
        P("url :80 frob")
    for word in ("url", "id", "docker-ns", "docker-run", "remote", "tunnel", "udptunnel"):
        with pytest.raises(SpecError, match=f"'{word}' needs an argument"):
            P(f"url :80 tail url :81 {word}")


def test_nothing_to_create():
    with pytest.raises(SpecError, match="nothing to create"):
        parse([])


# --- children ------------------------------------------------------------------

def test_child_head_copies_tail_and_service_port_follows():
    a, b = chain("url :80 trigger docker-run wp child url :3306 trigger docker-run mysql")
    assert a.trigger and a.tail.place == Place("docker-run", "wp") and a.tail.port == 80
    assert not a.linked and (a.link.where, a.link.transport, a.link.word) == ("child", "direct", "child")
    assert b.head.place == Place("docker-run", "wp") and b.head.port == 3306 and b.head.host == "127.0.0.1"
    assert b.tail.place == Place("docker-run", "mysql") and b.tail.port == 3306


def test_child_without_url_listens_where_the_parent_tail_points():
    a, b = chain("url ns1@:80 tail url ns2@ child tail url :81")
    assert b.head.place == Place("netns", "ns2") and b.head.port == 80 and b.tail.port == 81


def test_child_tail_uses_parent_service_port_when_its_head_has_none():
    a, b = chain("url :80 tail url ns1@:8080 child tail url ns2@")
    assert b.head.port == 8080 and b.service_port == 8080 and b.tail.port == 8080
    assert b.tail.place == Place("netns", "ns2")


def test_chain_links_the_tail_to_the_child_head():
    a, b = chain("url ns1@:80 chain tail url :8080")
    assert a.linked and a.tail == b.head
    assert b.head.place == HOST and b.head.port == 80 and b.tail.port == 8080


def test_chain_child_can_move_its_head_and_the_parent_follows():
    a, b = chain("url :80 tail url ns1@ chain url :90 tail url ns2@")
    assert a.tail == b.head and b.head.place == Place("netns", "ns1") and b.head.port == 90
    assert b.tail.port == 90 and b.tail.place == Place("netns", "ns2")


def test_chain_to_the_same_address_is_itself():
    with pytest.raises(SpecError, match="proxies to itself"):
        P("url ns1@:80 chain")


def test_flags_reset_after_a_chain_word():
    a, b = chain("url :80 trigger url ns1@ child url :81 tail url ns2@")
    assert a.trigger and not b.trigger
    a, b = chain("url :80 tail url ns1@ child url :81")  # modifiers apply to the child's head again
    assert b.head.port == 81 and b.tail.place == HOST and b.tail.port == 81 and b.head.place == Place("netns", "ns1")


def test_trigger_defers_the_chain_word_that_follows():
    a, b = chain("url :80 trigger url ns1@ child url :81 tail url ns2@")
    assert a.trigger  # the child is built on a's first connection
    assert not P("url :80 tail url ns1@ child url :81 tail url ns2@").trigger


def test_remote_child_words_and_tail():
    p = P("url :3306 remote myserver tail docker-ns mysql")
    assert p.linked and (p.link.where, p.link.transport) == ("remote", "direct") and p.link.host == "myserver"
    assert p.link.words == ("tail", "docker-ns", "mysql")
    assert p.tail.port is None and p.tail.host is None and p.child is None
    remote = plan(p.link.spec, Context(service_port=p.service_port, head_host=None))
    assert remote.head.host is None and remote.head.port is None
    assert remote.tail.port == 3306 and remote.tail.place == Place("docker-ns", "mysql")


@pytest.mark.parametrize("text", [
    "url :3306 tunnel myserver trigger docker-ns m",
    "url :3306 trigger tunnel myserver trigger docker-run wormhole/mysql",
    "url :3306 udptunnel [2001:db8::2]:9999",
])
def test_tunnels_parse(text):
    p = P(text)
    assert p.link.remote and p.linked


def test_remote_refuses_tail_settings_before_it_and_bad_hosts():
    with pytest.raises(SpecError, match="give tail settings after 'remote h'"):
        P("url :80 tail url :81 remote h")
    with pytest.raises(SpecError, match="bad"):
        P("url :80 remote h@x")
    with pytest.raises(SpecError, match="speaks tcp but the child on h speaks udp"):
        P("url :80 remote h url udp://")


def test_readme_examples_parse():
    for text in (
        "url :3306 tail docker-ns $mysql",
        "url :3306 docker-ns $app tail docker-ns $mysql",
        "url :80 trigger docker-run wormhole/wordpress child url :3306 trigger docker-run wormhole/mysql",
        "url :3306 remote myserver tail docker-ns $mysql",
        "url :3306 tunnel myserver trigger docker-ns $mysql",
        "url :3306 trigger tunnel myserver trigger docker-run wormhole/mysql",
        "url :80 trigger docker-run wormhole/wordpress child url :3306 tunnel myserver trigger docker-run wormhole/mysql",
    ):
        P(text.replace("$", "c-"))


def test_a_remote_child_may_have_no_words():
    p = plan(parse([], child=True), Context(service_port=3306, head_host="192.0.2.2"))
    assert p.head.host == "192.0.2.2" and p.head.port is None and p.tail.port == 3306


@pytest.mark.parametrize("words", [
    "url ns1@:80 tail url ns2@:81",
    "url :3306 tail docker-ns mysql",
    "url udp://[::1]:53 tail url udp://dns@[2001:db8::1]:53",
])
def test_printed_endpoints_read_back(words):
    """What `create` and `list` print for an end is a URL `url` reads back to the same end."""
    p = P(words)
    for end in (p.head, p.tail):
        url = Url.parse(str(end))
        assert (url.proto, url.place or HOST, url.host, url.port) == (end.proto, end.place, end.host, end.port)


def test_a_container_still_to_start_prints_as_words():
    p = plan(parse(["url", ":80", "trigger", "docker-run", "wormhole/wordpress"]))
    assert str(p.tail) == 'docker-run "wormhole/wordpress" url tcp://127.0.0.1:80'


def test_links_split_where_from_transport():
    for word, where, transport in (("child", "child", "direct"), ("chain", "chain", "direct"),
                                   ("remote", "remote", "direct"), ("tunnel", "remote", "tunnel"),
                                   ("udptunnel", "remote", "udptunnel")):
        link = parse(["url", ":80", word] + (["h"] if word in ("remote", "tunnel", "udptunnel") else [])).child
        assert (link.where, link.transport, link.word) == (where, transport, word)
        assert link.remote == (where == "remote") and link.tunnelled == (transport != "direct")


def test_chain_ids_and_remote_child_ids():
    p = P("id a url :80 tail url :81 chain tail url :82 child id c tail url :83")
    assert p.chain_ids("a") == ["a", "a.1", "c"]
    r = P("url :3306 tunnel myserver")
    assert r.remote_child_id("x") == "x.1" and p.remote_child_id("a") is None
    assert P("url :3306 remote h id far").remote_child_id("x") == "far"


def test_limits_on_words_length_and_links():
    from wormhole.spec import MAX_LINKS, MAX_WORD_LENGTH, MAX_WORDS
    with pytest.raises(SpecError, match=f"too many words: 10000 \\(the limit is {MAX_WORDS}\\)"):
        parse(["chain"] * 10000)
    with pytest.raises(SpecError, match=f"the limit is {MAX_WORD_LENGTH}"):
        parse(["url", ":" + "1" * (MAX_WORD_LENGTH + 1)])
    with pytest.raises(SpecError, match="too many linked wormholes: 17"):
        parse(["url", ":80"] + ["chain"] * (MAX_LINKS + 1))
    parse(["url", ":80"] + ["chain"] * MAX_LINKS)  # at the limit: fine


def test_max_conns_and_idle_timeout_words():
    from wormhole.spec import format_duration, parse_duration
    p = plan(parse(["url", ":80", "max-conns", "100", "idle-timeout", "5m", "tail", "url", ":81"]))
    assert (p.max_conns, p.idle_timeout) == (100, 300.0)
    p = plan(parse(["url", ":80", "tail", "url", ":81", "chain", "max-conns", "2", "url", ":82", "tail", "url", ":83"]))
    assert (p.max_conns, p.idle_timeout, p.child.max_conns) == (None, None, 2)
    assert [parse_duration(t, "d") for t in ("30", "30s", "500ms", "1.5s", "2m", "1h")] == \
        [30, 30, 0.5, 1.5, 120, 3600]
    assert [format_duration(s) for s in (30, 0.5, 1.5, 120, 3600, 90)] == ["30s", "500ms", "1.5s", "2m", "1h", "90s"]
    for words, msg in ((["max-conns", "0"], "bad max-conns '0'"), (["max-conns", "x"], "bad max-conns"),
                       (["idle-timeout", "0s"], "bad idle-timeout"), (["idle-timeout", "5 days"], "bad idle-timeout"),
                       (["idle-timeout", "9000h"], "at most a week"),
                       (["max-conns", "1", "max-conns", "2"], "'max-conns' given twice")):
        with pytest.raises(SpecError, match=msg):
            parse(["url", ":80", *words])


# --- unix sockets ------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ("unix:///run/app.sock", Url("unix", None, path="/run/app.sock")),
    ("unix://ns1@/run/app.sock", Url("unix", Place("netns", "ns1"), path="/run/app.sock")),
    ("unix://docker:db@/var/run/mysqld/mysqld.sock",
     Url("unix", Place("docker-ns", "db"), path="/var/run/mysqld/mysqld.sock")),
    ("unix:@name", Url("unix", None, path="@name")),
    ("unix:ns1@@name", Url("unix", Place("netns", "ns1"), path="@name")),
])
def test_unix_urls_parse_and_read_back(text, expect):
    assert Url.parse(text) == expect and str(expect) == text


@pytest.mark.parametrize("text,msg", [
    ("unix://relative/x", "path is absolute"), ("unix:name", r"unix:///PATH or unix:@NAME"),
    ("unix:///" + "a" * 107, "too long"), ("unix:@", "bad unix socket"), ("unix:///dir/", "bad unix socket"),
    ("unix://bad/ns@/x", "namespace name"),
])
def test_unix_url_errors(text, msg):
    with pytest.raises(SpecError, match=msg):
        Url.parse(text)


def test_unix_crosses_to_tcp_both_ways_but_not_to_udp():
    p = P("url :8080 tail url unix:///var/run/docker.sock")
    assert (p.tail.proto, p.tail.path, p.tail.host, p.tail.port) == ("unix", "/var/run/docker.sock", None, None)
    p = P("url unix:///run/h.sock tail url :80")
    assert (p.head.proto, p.head.path, p.head.port, p.mode) == ("unix", "/run/h.sock", None, 0o660)
    assert (p.tail.proto, p.tail.port) == ("tcp", 80), "a unix head's tail is tcp unless it says unix"
    for words, msg in (("url udp://:53 tail url unix:///x", "speaks udp but its tail speaks unix"),
                       ("url unix:///x tail", "tail with no port: give a tail port"),
                       ("url unix:///x tail url unix:///x", "proxies to itself"),
                       ("url unix:///a url :80 tail url :1", "takes a path .*not a host or port")):
        with pytest.raises(SpecError, match=msg):
            P(words)
    assert P("url unix://ns1@/x tail url unix:///x").tail.path == "/x", "another place is not itself"


def test_mode_word():
    assert P("url unix:///x mode 0600 tail url :1").mode == 0o600
    assert P("url unix:///x mode 640 tail url :1").mode == 0o640
    for words, msg in (("url unix:///x mode 0999 tail url :1", "bad mode"),
                       ("url unix:///x mode 01777 tail url :1", "bad mode"),
                       ("url :80 mode 0600 tail url :1", "unix head socket file"),
                       ("url unix:@x mode 0600 tail url :1", "unix head socket file"),
                       ("url unix:///x tail url :1 mode 0600", "give it before 'tail'"),
                       ("url unix:///x mode 0600 mode 0600 tail url :1", "given twice")):
        with pytest.raises(SpecError, match=msg):
            P(words)


def test_a_remote_childs_head_is_never_a_unix_socket():
    with pytest.raises(SpecError, match="cannot be a unix socket"):
        plan(parse(["url", "unix:///x"], child=True), Context(80, dialled=True))


def test_a_chain_after_a_unix_tail_listens_there_or_moves_to_tcp():
    p = P("url :80 tail url unix:///x chain tail url :81")
    assert p.child.head.path == "/x" and p.tail.path == "/x"
    p = P("url :80 tail url unix:///x chain url :90 tail url :81")
    assert (p.child.head.proto, p.child.head.host, p.child.head.port) == ("tcp", "127.0.0.1", 90)


# --- several tails -------------------------------------------------------------

def test_add_tail_and_balance():
    p = P("url :80 tail url :81 add-tail url :82 add-tail docker-ns web balance least-conns")
    assert [str(t) for t in p.all_tails] == ["tcp://127.0.0.1:81", "tcp://127.0.0.1:82",
                                             "tcp://docker:web@127.0.0.1:80"]
    assert p.balance == "least-conns" and P("url :80 tail url :81 add-tail url :82").balance == "round-robin"
    assert [str(t) for t in P("url :80 tail docker-ns a add-tail url :81").all_tails] == \
        ["tcp://docker:a@127.0.0.1:80", "tcp://127.0.0.1:81"], "tails default as always (the service port)"
    with pytest.raises(SpecError, match="proxies to itself"):
        P("url :80 add-tail url :81")  # the first tail is the head's own port


def test_add_tail_remote_makes_the_remote_child_one_of_the_tails():
    p = P("url :80 tail url :81 add-tail url ns1@:82 add-tail remote B tail url :83")
    assert p.link.host == "B" and p.link.words == ("tail", "url", ":83")
    assert [str(t) for t in p.all_tails] == ["tcp://*:*", "tcp://127.0.0.1:81", "tcp://ns1@127.0.0.1:82"]


def test_bad_tails():
    for words, msg in (("url :80 tail url :81 add-tail url udp://:82", "speaks tcp but its tail speaks udp"),
                       ("url :80 tail url :81 add-tail url :80", "proxies to itself"),
                       ("url :80 balance x", "bad balance"),
                       ("url :80 balance round-robin balance least-conns", "given twice"),
                       ("url unix:///h tail url :1 add-tail", "tail with no port")):
        with pytest.raises(SpecError, match=msg):
            P(words)
    from wormhole.spec import MAX_TAILS
    with pytest.raises(SpecError, match="too many tails"):
        parse(["url", ":80"] + ["add-tail"] * MAX_TAILS)


def test_k8s_ns_names_a_pod_and_reads_back():
    p = P("url :8080 tail k8s-ns shop/web url :80")
    assert p.tail.place == Place("k8s-ns", "shop/web") and str(p.tail) == "tcp://k8s:shop/web@127.0.0.1:80"
    assert Url.parse(str(p.tail)).place == p.tail.place
    assert Url.parse("unix://k8s:shop/web-1.x@/run/app.sock").place == Place("k8s-ns", "shop/web-1.x")
    for bad in ("shop", "Shop/web", "shop/", "/web", "shop/web/x", "-shop/web", "s_hop/web"):
        with pytest.raises(SpecError, match="bad pod"):
            P(f"url :8080 tail k8s-ns {bad} url :80")
