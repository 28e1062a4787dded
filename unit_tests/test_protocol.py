"""JSON-RPC framing and messages."""

import json

import pytest

from wormhole import protocol
from wormhole.protocol import LineFramer, Oversize, RpcError


def test_lines_split_across_feeds():
    f = LineFramer()
    assert f.feed(b'{"a"') == []
    assert f.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert f.feed(b":3}\n") == [b'{"c":3}']


def test_oversize_line_is_dropped_and_the_next_line_survives():
    f = LineFramer(limit=10)
    out = f.feed(b"x" * 8) + f.feed(b"y" * 8) + f.feed(b"z\nok\n")
    assert out == [Oversize(17), b"ok"]


def test_line_exactly_at_limit_passes():
    assert LineFramer(limit=4).feed(b"abcd\nabcde\n") == [b"abcd", Oversize(5)]


def test_default_limit_is_one_mebibyte():
    f = LineFramer()
    assert f.feed(b"a" * protocol.MAX_LINE + b"\n") == [b"a" * protocol.MAX_LINE]
    assert isinstance(f.feed(b"a" * (protocol.MAX_LINE + 1) + b"\n")[0], Oversize)


@pytest.mark.parametrize("line,code", [
    (b"{not json", protocol.PARSE_ERROR),
    (b"\xff\xfe", protocol.PARSE_ERROR),
    (b"[1,2]", protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","method":"x","id":1}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","method":"x","params":[1],"id":1}', protocol.INVALID_PARAMS),
    (Oversize(2 << 20), protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","method":"x","id":NaN}', protocol.PARSE_ERROR),
    (b'{"jsonrpc":"2.0","method":"x","params":{"a":-Infinity},"id":1}', protocol.PARSE_ERROR),
])
def test_bad_requests(line, code):
    with pytest.raises(RpcError) as e:
        protocol.parse_request(line)
    assert e.value.code == code


def test_deep_nesting_is_a_parse_error_naming_the_limit():
    with pytest.raises(RpcError, match=f"nested 100000 levels deep \\(the limit is {protocol.MAX_NESTING}\\)") as e:
        protocol.parse_request(b"[" * 100000)
    assert e.value.code == protocol.PARSE_ERROR
    deep = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":' + b"[" * 40 + b"]" * 40 + b"}}"
    with pytest.raises(RpcError, match="nested 42 levels"):
        protocol.parse_request(deep)
    # brackets inside strings (escaped quotes too) do not count
    text = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":"\\"' + b"[" * 100 + b'"}}'
    assert protocol.parse_request(text).params == {"a": '"' + "[" * 100}
    ok = b'{"jsonrpc":"2.0","id":1,"method":"echo","params":{"a":' + b"[" * 30 + b"]" * 30 + b"}}"
    assert protocol.parse_request(ok).method == "echo"


def test_request_round_trip():
    req = protocol.parse_request(protocol.request(7, "create", {"words": ["url", ":80"]}).rstrip(b"\n"))
    assert (req.id, req.method, req.params) == (7, "create", {"words": ["url", ":80"]})


def test_response_result_and_error():
    assert protocol.parse_response(protocol.result(3, {"ok": 1}).strip(), 3) == {"ok": 1}
    line = protocol.error(4, protocol.Refused("no wormhole with id 'x'")).strip()
    with pytest.raises(RpcError, match="no wormhole with id 'x'") as e:
        protocol.parse_response(line, 4)
    assert e.value.code == protocol.REFUSED
    with pytest.raises(RpcError, match="wrong or missing id"):
        protocol.parse_response(protocol.result(5, 1).strip(), 6)


def test_encoding_is_one_line():
    line = protocol.request(1, "echo", {"text": "a\nb"})
    assert line.count(b"\n") == 1 and json.loads(line)["params"]["text"] == "a\nb"
