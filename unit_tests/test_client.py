"""The control clients' error messages (no daemon: a stub channel, or nothing listening)."""

import asyncio
import errno
import json
import socket
import ssl
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wormhole import client, protocol
from wormhole.addr import Address
from wormhole.async_client import Client
from wormhole.client import call_once, failure_reason
from wormhole.keys import server_context
from wormhole.protocol import Failed
from wormhole.rpc import PARSE_ERROR, RpcError


class _Writer:
    def write(self, data):
        pass

    async def drain(self):
        pass

    def get_extra_info(self, name):
        return ("127.0.0.1", 40000) if name == "sockname" else ("127.0.0.1", 9999)


class _TimingOutReader:
    async def read(self, n):
        raise TimeoutError(errno.ETIMEDOUT, "Connection timed out")


class _SilentReader:
    async def read(self, n):
        await asyncio.sleep(10)


def test_a_socket_timeout_without_a_call_timeout_is_a_message_not_a_type_error():
    channel = Client(Address.parse("127.0.0.1"), _TimingOutReader(), _Writer())
    with pytest.raises(Failed, match="did not answer 'list' in time$"):
        asyncio.run(channel.call("list"))


def test_a_call_timeout_is_named():
    channel = Client(Address.parse("127.0.0.1"), _SilentReader(), _Writer())
    with pytest.raises(Failed, match=r"did not answer 'list' in time \(0.05 s\)"):
        asyncio.run(channel.call("list", timeout=0.05))


def test_the_channel_ends_are_known():
    channel = Client(Address.parse("127.0.0.1"), _SilentReader(), _Writer())
    assert channel.sockname == ("127.0.0.1", 40000) and channel.peername == ("127.0.0.1", 9999)


def test_failure_reasons_name_the_likely_cause():
    assert "TLS-PSK handshake failed; is the key the same" in failure_reason(ssl.SSLError(1, "alert"))
    assert "presented a certificate" in failure_reason(ssl.SSLCertVerificationError(1, "self-signed"))
    assert failure_reason(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "Connection refused"


def test_call_once_on_nothing_is_failed_naming_the_address(tmp_path):
    addr = Address.parse(f"unix://{tmp_path}/none.sock")
    with pytest.raises(Failed, match=rf"cannot reach wormholed at unix://{tmp_path}/none.sock: No such file"):
        call_once(addr, b"key", "ping")


# --- the blocking client on the C modules: what it writes and reads, against protocol.py ---

@given(st.text(max_size=30), st.one_of(st.none(), st.just({}),
                                       st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                                                       max_size=3)))
def test_a_request_line_is_protocols_byte_for_byte(method, params):
    assert client.request_line(method, params) == protocol.request(1, method, params)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300)
@given(JSON_VALUES, st.sampled_from(["", " ", "\t\r ", "  \n"]))
def test_decoding_a_line_is_json_loads(value, pad):
    line = (pad + json.dumps(value) + pad).encode()
    assert client.decode(line) == json.loads(line)


@pytest.mark.parametrize("line", [b"", b"   ", b"{", b'{"a":1} x', b"NaN", b"[Infinity]", b"\xff\xfe",
                                  b'{"a":1}{"b":2}', b"[" * 100000])
def test_what_json_loads_refuses_is_a_parse_error(line):
    with pytest.raises(RpcError) as e:
        client.decode(line)
    assert e.value.code == PARSE_ERROR and str(e.value).startswith("bad response from daemon: ")


def serve_once(reply: bytes, key: bytes = b"k" * 20):
    """A TLS-PSK server (the daemon's context, ssl's own sockets) that reads one line and
    sends REPLY; returns its address and the line it read (filled in once it has)."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve():
        with listener:
            conn, _ = listener.accept()
            try:
                with server_context(key).wrap_socket(conn, server_side=True) as tls:
                    got.append(tls.recv(65536))
                    tls.sendall(reply)
            except OSError:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return Address.parse(f"127.0.0.1:{listener.getsockname()[1]}"), got


def test_a_call_reads_the_result_over_tls_psk():
    addr, got = serve_once(b'{"jsonrpc":"2.0","id":1,"result":[{"id":"x"}]}\n')
    assert call_once(addr, b"k" * 20, "list") == [{"id": "x"}]
    assert got == [protocol.request(1, "list")]


def test_the_daemons_error_is_raised_as_it_sent_it():
    addr, _ = serve_once(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32001,"message":"no wormhole x"}}\n')
    with pytest.raises(RpcError, match="^no wormhole x$") as e:
        call_once(addr, b"k" * 20, "delete", {"id": "x"})
    assert e.value.code == protocol.REFUSED


def test_a_wrong_key_is_a_failed_handshake():
    addr, _ = serve_once(b"", key=b"other key")
    with pytest.raises(Failed, match="TLS-PSK handshake failed; is the key the same"):
        call_once(addr, b"k" * 20, "ping")


@pytest.mark.parametrize("reply, message", [
    (b'{"jsonrpc":"2.0","id":1,"res', "lost the connection to wormholed at .*: the daemon closed the connection$"),
    (b'{"jsonrpc":"2.0","id":2,"result":1}\n', "wrong or missing id"),
    (b"garbage\n", "bad response from daemon: "),
])
def test_a_broken_answer_is_one_clear_error(reply, message):
    addr, _ = serve_once(reply)
    with pytest.raises(RpcError, match=message):
        call_once(addr, b"k" * 20, "list")


def test_the_fast_path_imports_none_of_the_slow_modules():
    """What `wormhole list` and `ping` load: no ssl, socket, json, enum or re (each costs
    more than the call to the daemon; see client.py), nor asyncio or click."""
    code = ("import sys, wormhole.fast, wormhole.client, wormhole.tables, wormhole.rpc\n"
            "print(' '.join(sys.modules))")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=30,
                       env={"PYTHONPATH": str(__import__("pathlib").Path(client.__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split())
    assert not loaded & {"ssl", "socket", "json", "enum", "re", "typing", "asyncio", "click", "dataclasses"}


@settings(max_examples=300)
@given(JSON_VALUES)
def test_list_json_prints_what_json_dumps_prints(value):
    assert client.dumps_indented(value) == json.dumps(value, indent=1)


def test_list_json_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="not JSON serializable"):
        client.dumps_indented({"a": object()})
