"""JSON-RPC 2.0's error codes, the RpcError family, and what a decoded response says.

No imports: the CLI's blocking client (client.py) uses these without protocol.py, whose
`json` import alone costs a third of a `wormhole list` here (its regular expressions are
compiled at import). protocol.py re-exports every name, and the rest of the code imports
them from there."""

from __future__ import annotations

MAX_LINE = 1 << 20  # a line (without its newline) longer than this is refused

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


def result_of(msg: object, expect_id) -> object:
    """The result a decoded response carries, or raise the RpcError it carries."""
    if not isinstance(msg, dict) or msg.get("id") != expect_id:
        raise RpcError(INVALID_REQUEST, "bad response from daemon: wrong or missing id")
    if "error" in msg:
        err = msg["error"] if isinstance(msg["error"], dict) else {}
        raise RpcError(err.get("code", INTERNAL_ERROR), str(err.get("message", "unknown error")), err.get("data"))
    return msg.get("result")
