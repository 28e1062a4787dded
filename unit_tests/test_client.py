"""The control clients' error messages (no daemon: a stub channel, or nothing listening)."""

import asyncio
import errno
import ssl

import pytest

from wormhole.addr import Address
from wormhole.async_client import Client
from wormhole.client import call_once, failure_reason
from wormhole.protocol import Failed


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
    client = Client(Address.parse("127.0.0.1"), _TimingOutReader(), _Writer())
    with pytest.raises(Failed, match="did not answer 'list' in time$"):
        asyncio.run(client.call("list"))


def test_a_call_timeout_is_named():
    client = Client(Address.parse("127.0.0.1"), _SilentReader(), _Writer())
    with pytest.raises(Failed, match=r"did not answer 'list' in time \(0.05 s\)"):
        asyncio.run(client.call("list", timeout=0.05))


def test_the_channel_ends_are_known():
    client = Client(Address.parse("127.0.0.1"), _SilentReader(), _Writer())
    assert client.sockname == ("127.0.0.1", 40000) and client.peername == ("127.0.0.1", 9999)


def test_failure_reasons_name_the_likely_cause():
    assert "TLS-PSK handshake failed; is the key the same" in failure_reason(ssl.SSLError(1, "alert"))
    assert "presented a certificate" in failure_reason(ssl.SSLCertVerificationError(1, "self-signed"))
    assert failure_reason(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "Connection refused"


def test_call_once_on_nothing_is_failed_naming_the_address(tmp_path):
    addr = Address.parse(f"unix://{tmp_path}/none.sock")
    with pytest.raises(Failed, match=rf"cannot reach wormholed at unix://{tmp_path}/none.sock: No such file"):
        call_once(addr, b"key", "ping")
