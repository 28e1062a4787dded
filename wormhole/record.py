"""Record: equality, hash and repr over __slots__, as a frozen dataclass gives them.

The CLI's modules (protocol, addr) use it instead of dataclasses: the CLI imports them for
every command, and `dataclasses` (with the `inspect` it imports) costs more than a call to
the daemon does."""

from __future__ import annotations


class Record:
    """Equality and repr over __slots__, as a frozen dataclass gives them."""

    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={v!r}" for n, v in zip(self.__slots__, self._values()))
        return f"{type(self).__name__}({fields})"
