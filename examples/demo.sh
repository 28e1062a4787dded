#!/usr/bin/env bash
# make demo: the main job in a throwaway network namespace. A daemon with a
# fresh key, an echo service, a wormhole in front of it, bytes through it,
# `wormhole list`, then cleanup (on every path, via the EXIT trap).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
PY=$BIN/python
NS=whdemo$$
DIR=$(mktemp -d /tmp/wormhole-demo.XXXXXX)
KEY=$DIR/key.secret
CTL=unix://$DIR/ctl.sock
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
in_ns() { ip netns exec "$NS" "$@"; }
wh() { echo "\$ wormhole $*" >&2; in_ns "$BIN/wormhole" -H "$CTL" -K "$KEY" "$@"; }

say "a throwaway host: network namespace $NS"
ip netns add "$NS"
in_ns ip link set lo up

say "a fresh key"
"$BIN/wormhole" keygen > "$KEY"
chmod 600 "$KEY"

say "wormholed, listening on $CTL"
in_ns "$BIN/wormholed" -H "$CTL" -K "$KEY" --state-dir "$DIR/state" 2> "$DIR/wormholed.log" &
pids+=($!)
for _ in $(seq 100); do wh ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "ping: $(wh ping) ms"

say "an echo service on 127.0.0.1:7000"
in_ns "$PY" functional_tests/echo_server.py 127.0.0.1 7000 > "$DIR/echo.out" &
pids+=($!)
until grep -q ready "$DIR/echo.out" 2>/dev/null; do sleep 0.05; done

say "a wormhole from :8000 to the echo service"
wh create id demo url :8000 tail url :7000

say "bytes through it"
in_ns "$PY" - <<'PY'
import socket
s = socket.create_connection(("127.0.0.1", 8000))
s.sendall(b"hello through the wormhole\n")
s.shutdown(socket.SHUT_WR)
print("reply:", s.makefile("rb").read().decode().strip())
PY

say "what the daemon runs"
wh list

say "delete it"
wh delete demo
wh list
say "done; cleaning up"
