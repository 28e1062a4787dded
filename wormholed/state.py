"""Records in --state-dir, one JSON file each, written atomically.

`wormholes/` keeps the words each wormhole was created with (a restarted
daemon builds it again from them; SIGTERM keeps the records, `delete`
removes one); `tunnels/` keeps what each tunnel's half on this host was built
from (its keys, ports and addresses, so that it can be rebuilt exactly).
`daemon-id` is this daemon's lasting identity.

One daemon uses a state dir at a time: it holds an flock on the directory
itself (which works on a read-only one too) and writes its pid to
`daemon.pid` for the message a second daemon gets. A read-only state dir
still starts (records are restored); each change that cannot be recorded is
refused (RecordError), with nothing changed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import uuid
from collections.abc import Callable

log = logging.getLogger("wormholed")
_SAFE = re.compile(r"[A-Za-z0-9_.:-]+")


class RecordError(Exception):
    """A record could not be written or removed; the message names it and why."""


class StateLocked(Exception):
    """Another daemon uses this state dir."""


def _why(e: OSError) -> str:
    return e.strerror or str(e)


class RecordDir:
    """A directory of NAME.json records (mode 0700: tunnel records hold private keys)."""

    def __init__(self, path: str):
        self.path = path

    def ensure(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)

    def _file(self, ident: str) -> str:
        if not _SAFE.fullmatch(ident):
            raise ValueError(f"unsafe record name {ident!r}")
        return os.path.join(self.path, f"{ident}.json")

    def save(self, ident: str, record: dict) -> None:
        """Write-then-rename, so a crash leaves the old record or the new one, never half.
        RecordError (nothing changed) when it cannot be written: read-only, full."""
        path = self._file(ident)
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as e:
            raise RecordError(f"cannot write its record in {self.path}: {_why(e)}") from None
        try:
            with open(fd, "w") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # ENOSPC, EDQUOT, EIO: the old record (if any) stays
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise RecordError(f"cannot write its record in {self.path}: {_why(e)}") from None
        dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def remove(self, ident: str) -> None:
        """RecordError when the record is there and cannot be removed (read-only)."""
        if not _SAFE.fullmatch(ident):
            return  # no record can have that name
        try:
            os.unlink(self._file(ident))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise RecordError(f"cannot remove its record from {self.path}: {_why(e)}") from None

    def load(self, check: Callable[[str, dict], None] | None = None) -> list[dict]:
        """Every readable record, oldest first; unreadable ones, and those ``check(name, record)``
        refuses (ValueError), are logged and skipped."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            path = os.path.join(self.path, name)
            if name.endswith(".tmp"):  # a write that a crash cut short
                try:
                    os.unlink(path)
                except OSError as e:
                    log.warning("cannot remove the unfinished record %s: %s", path, _why(e))
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    record = json.load(f)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                if check is not None:
                    check(name[:-len(".json")], record)
                records.append((os.stat(path).st_mtime, record))
            except (OSError, ValueError, RecursionError) as e:
                log.warning("skipping unreadable record %s: %s", path, e)
        return [r for _, r in sorted(records, key=lambda x: x[0])]


class StateDir(RecordDir):
    """The state dir; as a RecordDir, its wormhole records."""

    def __init__(self, path: str):
        super().__init__(os.path.join(path, "wormholes"))
        self.root = path
        self.tunnels = RecordDir(os.path.join(path, "tunnels"))

        self._lock: int | None = None

    def ensure(self) -> None:
        """The directories, made if missing; a read-only state dir is logged, not an error."""
        try:
            super().ensure()
            self.tunnels.ensure()
        except OSError as e:
            if not os.path.isdir(self.path):
                raise RecordError(f"cannot make the state dir {self.path}: {_why(e)}") from None
        if not self.writable():
            log.warning("state dir %s is read-only: wormholes are restored, but changes cannot be "
                        "recorded and are refused", self.root)

    def writable(self) -> bool:
        return os.access(self.path, os.W_OK)

    def lock(self) -> None:
        """Take the state dir for this daemon, or StateLocked naming the daemon that has it."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)  # not inherited by what the daemon runs
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.root, "daemon.pid")) as f:
                    holder = f" (pid {int(f.read().strip())})"
            raise StateLocked(f"state dir {self.root} is in use by another wormholed{holder}: "
                              f"give this daemon its own --state-dir") from None
        self._lock = fd
        with contextlib.suppress(OSError):
            with open(os.path.join(self.root, "daemon.pid"), "w") as f:
                f.write(f"{os.getpid()}\n")

    def unlock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.root, "daemon.pid"))
            os.close(self._lock)
            self._lock = None

    def daemon_id(self) -> str:
        """This daemon's lasting identity (labels on what it starts, tunnel names), made on first use."""
        path = os.path.join(self.root, "daemon-id")
        try:
            with open(path) as f:
                ident = f.read().strip()
            if ident:
                return ident
        except FileNotFoundError:
            pass
        ident = uuid.uuid4().hex
        try:
            with open(path, "w") as f:
                f.write(ident + "\n")
        except OSError as e:
            log.warning("cannot record this daemon's id in %s (%s): it lasts until the daemon stops",
                        path, _why(e))
        return ident


def check_wormhole_record(name: str, record: dict) -> None:
    """A wormhole record as `create` writes it: {"id": its file's name, "words": [str, ...]}."""
    ident, words = record.get("id"), record.get("words")
    if not isinstance(ident, str) or ident != name:
        raise ValueError(f"its id {ident!r} is not its file's name {name!r}")
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError("its words are not a list of strings")
