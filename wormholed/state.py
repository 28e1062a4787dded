"""Records in --state-dir, one JSON file each, written atomically.

`wormholes/` keeps the words each wormhole was created with (a restarted
daemon builds it again from them; SIGTERM keeps the records, `delete`
removes one); `tunnels/` keeps what each tunnel's half on this host was built
from (its keys, ports and addresses, so that it can be rebuilt exactly).
`daemon-id` is this daemon's lasting identity."""

from __future__ import annotations

import json
import logging
import os
import re
import uuid

log = logging.getLogger("wormholed")
_SAFE = re.compile(r"[A-Za-z0-9_.:-]+")


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
        """Write-then-rename, so a crash leaves the old record or the new one, never half."""
        path = self._file(ident)
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def remove(self, ident: str) -> None:
        try:
            os.unlink(self._file(ident))
        except FileNotFoundError:
            pass

    def load(self) -> list[dict]:
        """Every readable record, oldest first; unreadable ones are logged and skipped."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            path = os.path.join(self.path, name)
            if name.endswith(".tmp"):
                os.unlink(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    record = json.load(f)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                records.append((os.stat(path).st_mtime, record))
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable record %s: %s", path, e)
        return [r for _, r in sorted(records, key=lambda x: x[0])]


class StateDir(RecordDir):
    """The state dir; as a RecordDir, its wormhole records."""

    def __init__(self, path: str):
        super().__init__(os.path.join(path, "wormholes"))
        self.root = path
        self.tunnels = RecordDir(os.path.join(path, "tunnels"))

    def ensure(self) -> None:
        super().ensure()
        self.tunnels.ensure()

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
        with open(path, "w") as f:
            f.write(ident + "\n")
        return ident
