"""JSON-RPC 2.0 over lines: framing, messages and error codes. No I/O.

One JSON object per line; a line over MAX_LINE is refused. Application errors carry
one of two codes: REFUSED (the caller asked for something wrong) and FAILED (the
system or a peer failed). Its two records are record.Record classes, not dataclasses
(the CLI imports this module for every call)."""

from __future__ import annotations

import json

from .record import Record

MAX_LINE = 1 << 20  # a line (without its newline) longer than this is refused
MAX_NESTING = 32  # arrays/objects nested deeper than this are refused (a parse error)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes: the caller asked for something wrong / the system or a peer failed.
REFUSED = -32001
FAILED = -32002
BUSY = -32003  # a daemon-to-daemon answer: the same thing is being done from this end; ask again


class RpcError(Exception):
    """An error that crosses the wire; `str()` is the message for the user."""

    def __init__(self, code: int, message: str, data=None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def to_json(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class Refused(RpcError):
    """You asked for something wrong (bad spec, unknown id, missing namespace)."""

    def __init__(self, message: str, data=None):
        super().__init__(REFUSED, message, data)


class Failed(RpcError):
    """The system or a peer failed while doing what was asked."""

    def __init__(self, message: str, data=None):
        super().__init__(FAILED, message, data)


class Oversize(Record):
    """Stands in the line stream for a line that was over MAX_LINE and dropped."""

    __slots__ = ("length",)

    def __init__(self, length: int):
        self.length = length


class LineFramer:
    """Bytes in, complete lines out; an oversize line becomes one Oversize and is skipped."""

    def __init__(self, limit: int = MAX_LINE):
        self._limit = limit
        self._buf = bytearray()
        self._dropping = 0  # >0: inside an oversize line, this many bytes dropped so far

    def feed(self, data: bytes) -> list[bytes | Oversize]:
        out: list[bytes | Oversize] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl]
            if self._dropping:
                self._dropping += len(piece)
            elif len(self._buf) + len(piece) > self._limit:
                self._dropping = len(self._buf) + len(piece)
                self._buf.clear()
            else:
                self._buf += piece
            if nl < 0:
                return out
            if self._dropping:
                out.append(Oversize(self._dropping))
                self._dropping = 0
            else:
                out.append(bytes(self._buf))
                self._buf.clear()
            start = nl + 1


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(id_: int, method: str, params: dict | None = None) -> bytes:
    return encode({"jsonrpc": "2.0", "id": id_, "method": method, "params": params or {}})


def result(id_, value) -> bytes:
    return encode({"jsonrpc": "2.0", "id": id_, "result": value})


def error(id_, err: RpcError) -> bytes:
    return encode({"jsonrpc": "2.0", "id": id_, "error": err.to_json()})


class Request(Record):
    __slots__ = ("id", "method", "params")

    def __init__(self, id: int | str | None, method: str, params: dict):
        self.id, self.method, self.params = id, method, params


def nesting(line: str) -> int:
    """How deep the brackets of a JSON text nest (those inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN and Infinity; JSON has neither


def _loads(line: bytes | str, what: str):
    """json.loads of UTF-8 text (the wire's encoding: json would guess UTF-16 and UTF-32 from
    bytes too), with the nesting limit checked first (json's parser recurses per level)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RpcError(PARSE_ERROR, f"{what}: not UTF-8: {e}") from None
    if line.count("[") + line.count("{") > MAX_NESTING:  # else it cannot nest deeper: no scan
        if (depth := nesting(line)) > MAX_NESTING:
            raise RpcError(PARSE_ERROR, f"{what}: JSON nested {depth} levels deep (the limit is {MAX_NESTING})")
    try:
        return json.loads(line, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RpcError(PARSE_ERROR, f"{what}: {e}") from None


def parse_request(line: bytes | Oversize) -> Request:
    """Raises RpcError with the id it could read (in .data) when the line is not a request."""
    if isinstance(line, Oversize):
        raise RpcError(INVALID_REQUEST, f"request line of {line.length} bytes refused (limit {MAX_LINE})")
    msg = _loads(line, "parse error")
    if not isinstance(msg, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: not a JSON object")
    id_ = msg.get("id")
    if msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method"), str):
        raise RpcError(INVALID_REQUEST, "invalid request: needs jsonrpc '2.0' and a method", {"id": id_})
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object", {"id": id_})
    return Request(id_, msg["method"], params)


def parse_response(line: bytes | Oversize, expect_id) -> object:
    """The result of a response line, or raise the RpcError it carries."""
    if isinstance(line, Oversize):
        raise RpcError(INVALID_REQUEST, f"response line of {line.length} bytes refused")
    msg = _loads(line, "bad response from daemon")
    if not isinstance(msg, dict) or msg.get("id") != expect_id:
        raise RpcError(INVALID_REQUEST, "bad response from daemon: wrong or missing id")
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise RpcError(err.get("code", INTERNAL_ERROR), str(err.get("message", "unknown error")), err.get("data"))
    return msg.get("result")
