"""Records of wormholes in --state-dir (DESIGN §8), one JSON file each, written atomically."""

from __future__ import annotations

import json
import logging
import os
import re
import uuid

log = logging.getLogger("wormholed")
_SAFE = re.compile(r"[A-Za-z0-9_.:-]+")


class StateDir:
    def __init__(self, path: str):
        self.path = path
        self._dir = os.path.join(path, "wormholes")

    def ensure(self) -> None:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)

    def _file(self, ident: str) -> str:
        if not _SAFE.fullmatch(ident):
            raise ValueError(f"unsafe record name {ident!r}")
        return os.path.join(self._dir, f"{ident}.json")

    def save(self, ident: str, record: dict) -> None:
        """Write-then-rename, so a crash leaves the old record or the new one, never half."""
        path = self._file(ident)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dirfd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def daemon_id(self) -> str:
        """This daemon's lasting identity (labels on what it starts), made on first use."""
        path = os.path.join(self.path, "daemon-id")
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            ident = uuid.uuid4().hex
            with open(path, "w") as f:
                f.write(ident + "\n")
            return ident

    def remove(self, ident: str) -> None:
        try:
            os.unlink(self._file(ident))
        except FileNotFoundError:
            pass

    def load(self) -> list[dict]:
        """Every readable record, oldest first; unreadable ones are logged and skipped."""
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return []
        records = []
        for name in names:
            path = os.path.join(self._dir, name)
            if name.endswith(".tmp"):
                os.unlink(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path) as f:
                    records.append((os.stat(path).st_mtime, json.load(f)))
            except (OSError, ValueError) as e:
                log.warning("skipping unreadable record %s: %s", path, e)
        return [r for _, r in sorted(records, key=lambda x: x[0])]
