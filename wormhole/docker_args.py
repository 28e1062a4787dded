"""`docker-run "ARGS"`: the `docker run -d` arguments wormhole understands, parsed. No I/O."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass



class RunArgsError(ValueError):
    """The docker-run arguments are not ones wormhole can run; the message says why."""

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(=.*)?", re.DOTALL)
# option -> RunSpec field; flags take no value
_VALUED = {"--name": "name", "-e": "env", "--env": "env", "-v": "volumes", "--volume": "volumes",
           "-w": "workdir", "--workdir": "workdir", "-u": "user", "--user": "user",
           "--entrypoint": "entrypoint", "-l": "labels", "--label": "labels"}
_FLAGS = {"--rm": "remove", "-d": None, "--detach": None}
SUPPORTED = "--name, -e/--env, -v/--volume, -w/--workdir, -u/--user, --entrypoint, -l/--label, --rm, -d"


@dataclass(frozen=True)
class RunSpec:
    image: str
    command: tuple[str, ...] = ()
    name: str | None = None
    env: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    labels: tuple[str, ...] = ()
    remove: bool = False  # --rm: the engine removes it once it stops


def parse_run_args(text: str) -> RunSpec:
    """`[OPTIONS] IMAGE [COMMAND [ARG...]]` as `docker run` takes them; raises RunArgsError."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise RunArgsError(f"docker-run {text!r}: {e}") from None
    fields: dict = {"env": [], "volumes": [], "labels": []}
    i = 0
    while i < len(words) and words[i].startswith("-") and words[i] != "-":
        opt, eq, value = words[i].partition("=")
        if opt.startswith("-") and not opt.startswith("--") and len(opt) > 2 and not eq:
            opt, value, eq = opt[:2], opt[2:], "="  # -eFOO=1
        i += 1
        if opt in _FLAGS:
            if eq:
                raise RunArgsError(f"docker-run: option {opt} takes no value")
            if _FLAGS[opt]:
                fields[_FLAGS[opt]] = True
            continue
        if opt not in _VALUED:
            raise RunArgsError(f"docker-run: unknown option {opt!r}; wormhole supports {SUPPORTED}")
        if not eq:
            if i >= len(words):
                raise RunArgsError(f"docker-run: option {opt} needs a value")
            value, i = words[i], i + 1
        field = _VALUED[opt]
        _check(opt, field, value)
        if isinstance(fields.get(field), list):
            fields[field].append(value)
        else:
            fields[field] = value
    if i >= len(words):
        raise RunArgsError(f"docker-run {text!r}: no image given")
    image, command = words[i], tuple(words[i + 1:])
    return RunSpec(image=image, command=command, **{k: tuple(v) if isinstance(v, list) else v
                                                     for k, v in fields.items()})


def _check(opt: str, field: str, value: str) -> None:
    if field == "name" and not _NAME.fullmatch(value):
        raise RunArgsError(f"docker-run: bad container name {value!r}")
    if field == "env" and not _ENV.fullmatch(value):
        raise RunArgsError(f"docker-run: bad environment variable {value!r} (use NAME=VALUE)")
    if field == "volumes" and (value.count(":") not in (1, 2) or not all(value.split(":")[:2])):
        raise RunArgsError(f"docker-run: bad volume {value!r} (use SRC:DST[:ro|rw])")
    if not value:
        raise RunArgsError(f"docker-run: option {opt} needs a value")
