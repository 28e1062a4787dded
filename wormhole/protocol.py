"""JSON-RPC 2.0 over lines: framing, messages and error codes. No I/O.

One JSON object per line; a line over MAX_LINE is refused. Application errors carry
one of two codes: REFUSED (the caller asked for something wrong) and FAILED (the
system or a peer failed). The codes and errors live in rpc.py, which the CLI's blocking
client uses without this module's `json` (see there); they are re-exported here."""

from __future__ import annotations

import json

from .record import Record
from .rpc import (BUSY, FAILED, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, MAX_LINE,
                  METHOD_NOT_FOUND, PARSE_ERROR, REFUSED, Failed, Refused, RpcError, result_of)

MAX_NESTING = 32  # arrays/objects nested deeper than this are refused (a parse error)


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
    return result_of(_loads(line, "bad response from daemon"), expect_id)


__all__ = ["MAX_LINE", "MAX_NESTING", "PARSE_ERROR", "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS",
           "INTERNAL_ERROR", "REFUSED", "FAILED", "BUSY", "RpcError", "Refused", "Failed", "Oversize", "LineFramer",
           "encode", "request", "result", "error", "Request", "nesting", "parse_request", "parse_response"]
