"""`call_once(addr, key, method, params)`: one call on a fresh TLS-PSK connection with
blocking sockets, the control channel's client side as the CLI uses it.

The CLI starts afresh for every command, so what this module imports is paid by every
`wormhole list`. Here `import ssl` costs about 30 ms (it turns hundreds of constants into
enums and pulls in `re`) and `import json` about 15 ms (it compiles its regular
expressions), while the call itself (connect, TLS 1.3 PSK handshake, one round trip)
takes 2-3 ms. So this module works with the C modules under them, as they do:

- the context is `_ssl._SSLContext`, set by `keys.client_context(lean=True)` exactly as
  the asyncio client's `ssl.SSLContext` (a subclass that adds only Python helpers);
- the socket is an `_socket.socket`, wrapped with `_SSLContext._wrap_socket` and driven
  with `do_handshake`, `read` and `write`: the calls `ssl.SSLSocket` makes itself;
- a request without params is written here and the answer read with `_json`'s scanner,
  the parser `json.loads` runs; `list --json` prints with `dumps_indented`, the C
  encoder `json.dumps` runs. `unit_tests/test_client.py` checks all three against
  protocol.py and json. A request with params (create, delete) has protocol.py encode
  it: those commands load click, and json, anyway.

The asyncio client (`async with connect(addr, key) as c`, what a daemon uses to call
another) is in async_client.py: importing asyncio alone would take longer than a whole
`wormhole list` should."""

from __future__ import annotations

import _json
import _socket
import _ssl

from .addr import Address, literal_family
from .keys import client_context
from .rpc import INVALID_REQUEST, MAX_LINE, PARSE_ERROR, Failed, RpcError, result_of

CONNECT_TIMEOUT = 5.0
_WHITESPACE = " \t\n\r"  # JSON's


def failure_reason(e: BaseException) -> str:
    """Why a connection to a daemon failed, for the user (a wrong key reads as a failed handshake)."""
    if isinstance(e, _ssl.SSLCertVerificationError):
        return "it presented a certificate, so it is not a wormholed holding our key (refused)"
    if isinstance(e, (_ssl.SSLError, ConnectionResetError, EOFError)):
        return f"TLS-PSK handshake failed; is the key the same on both sides? ({e.__class__.__name__})"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


def lost_reason(e: BaseException) -> str:
    """Why an established channel broke (the handshake is behind it: no key to blame)."""
    if isinstance(e, _ssl.SSLError):
        return f"TLS error ({e.__class__.__name__}: {e.reason or e})"
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


class _Socket(_socket.socket):
    """`_ssl` keeps a weak reference to the socket it wraps, which the C type alone cannot give."""

    __slots__ = ("__weakref__",)


def _blocking_socket(addr: Address, timeout: float) -> _socket.socket:
    if addr.kind == "unix":
        family, target = _socket.AF_UNIX, addr.path
    else:
        host = addr.host or "127.0.0.1"
        family, target = literal_family(host), (host, addr.port)
        if not family:  # a name: resolved, each address tried (no getaddrinfo otherwise: its
            import socket  # first call in a process costs ~2 ms of NSS set-up)

            sock = socket.create_connection(target, timeout=timeout)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            return sock
    sock = _Socket(family, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        if family != _socket.AF_UNIX:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def request_line(method: str, params: dict | None = None) -> bytes:
    """protocol.request(1, method, params), byte for byte."""
    if params:
        from .protocol import request

        return request(1, method, params)
    return b'{"jsonrpc":"2.0","id":1,"method":%s,"params":{}}\n' % _json.encode_basestring_ascii(method).encode()


class _Decoding:
    """What `_json`'s scanner reads from its context: json.loads's defaults, except that
    NaN and Infinity are refused (JSON has neither; protocol.py refuses them too)."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name: str):
        raise ValueError(f"{name} is not JSON")


_scan = _json.make_scanner(_Decoding())


def decode(line: bytes) -> object:
    """json.loads of one UTF-8 line; RpcError(PARSE_ERROR) for anything else."""
    what = "bad response from daemon"
    try:
        text = line.decode("utf-8")
        start = len(text) - len(text.lstrip(_WHITESPACE))
        value, end = _scan(text, start)
        if text[end:].strip(_WHITESPACE):
            raise ValueError(f"extra data at character {end}")
        return value
    except StopIteration as e:
        raise RpcError(PARSE_ERROR, f"{what}: expecting a value at character {e.value}") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise RpcError(PARSE_ERROR, f"{what}: {e}") from None


def _not_serializable(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def dumps_indented(value) -> str:
    """json.dumps(value, indent=1), with the encoder json.dumps runs (`list --json`)."""
    try:  # (markers, default, encoder, indent, key separator, item separator, sort_keys, skipkeys, allow_nan)
        encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring_ascii, " ", ": ", ",",
                                    False, False, True)
    except TypeError:  # an interpreter whose C encoder takes no indent: json's own
        import json

        return json.dumps(value, indent=1)
    return "".join(encode(value, 0))


def _read_line(tls) -> bytes:
    buf = bytearray()
    while (nl := buf.find(b"\n")) < 0:
        if len(buf) > MAX_LINE:
            raise RpcError(INVALID_REQUEST, f"response line of over {MAX_LINE} bytes refused")
        try:
            data = tls.read(1 << 16)
        except _ssl.SSLEOFError:  # closed without a TLS close_notify
            data = b""
        if not data:
            raise EOFError("the daemon closed the connection")
        buf += data
    return bytes(buf[:nl])


def call_once(addr: Address, key: bytes, method: str, params: dict | None = None, *,
              timeout: float = CONNECT_TIMEOUT, identity: str | None = None, ctx=None):
    """One call on a fresh connection, with blocking sockets: what the CLI makes. A call
    costs the connection, the handshake and one round trip. ctx: a client_context(key,
    identity, lean=True) made beforehand (an ssl.SSLContext works too). Raises RpcError:
    the daemon's, or Failed (unreachable, wrong key, connection lost)."""
    ctx = ctx or client_context(key, identity, lean=True)
    try:
        sock = _blocking_socket(addr, timeout)
        try:
            tls = ctx._wrap_socket(sock, False, None)
            tls.do_handshake()  # within the timeout
        except BaseException:
            sock.close()
            raise
    except TimeoutError:
        raise Failed(f"cannot reach wormholed at {addr}: no answer within {timeout:g} s") from None
    except (OSError, EOFError) as e:  # ssl's errors are OSErrors
        raise Failed(f"cannot reach wormholed at {addr}: {failure_reason(e)}") from None
    try:
        sock.settimeout(None)  # a create may take long (a trigger starting a container)
        out = memoryview(request_line(method, params))
        while out:
            out = out[tls.write(out):]
        return result_of(decode(_read_line(tls)), 1)
    except (OSError, EOFError) as e:
        raise Failed(f"lost the connection to wormholed at {addr}: {lost_reason(e)}") from None
    finally:
        sock.close()


__all__ = ["call_once", "failure_reason", "lost_reason", "CONNECT_TIMEOUT", "RpcError"]
