"""Control addresses (-H) and the key file."""

import os

import pytest

from wormhole.addr import Address, AddressError
from wormhole.keys import KeyFileError, keygen, load_key


@pytest.mark.parametrize("text,default,expect", [
    ("tcp://10.0.0.1:1234", None, Address("tcp", "10.0.0.1", 1234)),
    ("10.0.0.1:1234", None, Address("tcp", "10.0.0.1", 1234)),
    (":1234", None, Address("tcp", None, 1234)),
    (":1234", "127.0.0.1", Address("tcp", "127.0.0.1", 1234)),
    ("myhost", None, Address("tcp", "myhost", 9999)),
    ("[2001:db8::2]:9999", None, Address("tcp", "2001:db8::2", 9999)),
    ("tcp://[::1]", None, Address("tcp", "::1", 9999)),
    ("unix:///run/wormhole.sock", None, Address("unix", path="/run/wormhole.sock")),
])
def test_address_parse(text, default, expect):
    assert Address.parse(text, default) == expect


def test_relative_unix_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Address.parse("unix://./socket") == Address("unix", path=str(tmp_path / "socket"))
    assert Address.parse("unix://run/w.sock") == Address("unix", path=str(tmp_path / "run/w.sock"))


@pytest.mark.parametrize("text", ["unix://", "http://x:1", "tcp://:99999", ":0", "[::1:80", "a:b"])
def test_address_errors(text):
    with pytest.raises(AddressError):
        Address.parse(text)


def test_address_str_round_trips():
    for text in ("tcp://[::1]:9", "unix:///a/b", "tcp://h:1"):
        assert str(Address.parse(text)) == text


def _write(tmp_path, data, mode=0o600):
    path = tmp_path / "key.secret"
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


@pytest.mark.parametrize("make", [os.mkfifo, lambda p, mode: None], ids=["fifo", "device"])
def test_key_file_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, make):
    """A FIFO would block open() until a writer comes: it is opened non-blocking and refused."""
    path = str(tmp_path / "key.secret")
    make(path, 0o600)
    with pytest.raises(KeyFileError, match="is not a regular file"):
        load_key(path if os.path.exists(path) else "/dev/null")


def test_key_trailing_whitespace_ignored(tmp_path):
    assert load_key(_write(tmp_path, b"s3cret \n\n")) == b"s3cret"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_readable_by_others_refused(tmp_path, mode):
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(_write(tmp_path, b"k", mode))


def test_key_missing_empty_directory(tmp_path):
    with pytest.raises(KeyFileError, match="not found"):
        load_key(str(tmp_path / "nope"))
    with pytest.raises(KeyFileError, match="empty"):
        load_key(_write(tmp_path, b" \n"))
    os.chmod(tmp_path, 0o700)
    with pytest.raises(KeyFileError, match="not a regular file|directory"):
        load_key(str(tmp_path))


def test_keygen_is_random_alnum():
    a, b = keygen(), keygen()
    assert a != b and len(a) == 40 and a.isalnum()
