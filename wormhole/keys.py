"""The pre-shared key (key.secret) and the TLS 1.3 external-PSK contexts built on it.

The key file is refused when missing, empty, not a regular file, or readable by
group or others (as ssh does). The contexts: the server has no certificate, and the
client trusts no CA, so a handshake succeeds only when the PSK authenticated it.

keygen imports secrets itself, and `ssl` is imported only for the asyncio contexts:
every CLI command imports this module, only keygen makes a key, and the CLI's blocking
client wraps its socket with `_ssl` itself (see client.py)."""

from __future__ import annotations

import os
import stat

import _socket
import _ssl

TYPE_CHECKING = False  # typing's own flag, without importing typing
if TYPE_CHECKING:
    import ssl

DEFAULT_KEYFILE = "/etc/wormhole/key.secret"


class KeyFileError(Exception):
    pass


def load_key(path: str = DEFAULT_KEYFILE) -> bytes:
    """The key's bytes; refuses a missing, empty, or group/other-readable file (like ssh)."""
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with open(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if mode & 0o077:
                raise KeyFileError(f"key file {path} is accessible by group or others "
                                   f"(mode {stat.S_IMODE(mode):04o}): run 'chmod 600 {path}'")
            key = f.read().rstrip()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found: create it with "
                           f"'wormhole keygen > {path} && chmod 600 {path}'") from None
    except PermissionError:
        raise KeyFileError(f"key file {path} cannot be read: permission denied") from None
    except IsADirectoryError:
        raise KeyFileError(f"key file {path} is a directory") from None
    except OSError as e:  # ENXIO: a FIFO nobody writes to; ELOOP, EIO...
        raise KeyFileError(f"key file {path} cannot be read: {e.strerror or e}") from None
    if not key:
        raise KeyFileError(f"key file {path} is empty")
    return key


def keygen(length: int = 40) -> str:
    """A random key for key.secret: ~238 bits in letters and digits."""
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _tls13(protocol: int, lean: bool = False) -> ssl.SSLContext:
    if lean:
        ctx = _ssl._SSLContext(protocol)
    else:
        import ssl

        ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = _ssl.PROTO_TLSv1_3
    return ctx


def server_context(key: bytes) -> ssl.SSLContext:
    """No certificate: a client that does not prove the key fails the handshake. No session
    tickets: every connection proves the key afresh, so a ticket would be work (two are
    made and encrypted per handshake by default) and bytes for nothing."""
    ctx = _tls13(_ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0
    ctx.set_psk_server_callback(lambda identity: key)
    return ctx


def client_context(key: bytes, identity: str | None = None, *, lean: bool = False) -> ssl.SSLContext:
    """Only a PSK handshake can succeed: any certificate a server presents fails
    verification, as the context trusts no CA at all. lean: the C context under
    ssl.SSLContext (the same settings, without importing `ssl`), for client.py."""
    ctx = _tls13(_ssl.PROTOCOL_TLS_CLIENT, lean)
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_REQUIRED
    name = identity or _socket.gethostname()
    ctx.set_psk_client_callback(lambda hint: (name, key))
    return ctx
