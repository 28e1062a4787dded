#!/usr/bin/env bash
# make demo: wormhole's main jobs on two throwaway hosts (network namespaces
# joined by a veth link, 192.0.2.1 <-> 192.0.2.2), each running its own
# wormholed with a fresh shared key. A local wormhole in front of an echo
# service, then a remote one from the first host to it, bytes through both,
# `wormhole list` on each side, delete. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
PY=$BIN/python
A=whdemoa$$ B=whdemob$$
DIR=$(mktemp -d /tmp/wormhole-demo.XXXXXX)
KEY=$DIR/key.secret
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT
say() { printf '\n\033[1m# %s\033[0m\n' "$*"; }
wh() { local host=$1; shift; echo "[$host]\$ wormhole $*" >&2
       ip netns exec "$host" "$BIN/wormhole" -H "unix://$DIR/$host.sock" -K "$KEY" "$@"; }
send() { ip netns exec "$1" "$PY" -c '
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.argv[2].encode())
s.shutdown(socket.SHUT_WR)
print("reply:", s.makefile("rb").read().decode())' "$2" "$3"; }

say "two throwaway hosts: $A (192.0.2.1) and $B (192.0.2.2)"
ip netns add "$A"; ip netns add "$B"
ip link add "a$$" netns "$A" type veth peer name "b$$" netns "$B"
ip -n "$A" addr add 192.0.2.1/24 dev "a$$"; ip -n "$B" addr add 192.0.2.2/24 dev "b$$"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "a$$" up; ip -n "$B" link set "b$$" up

say "a fresh key, shared by both daemons"
"$BIN/wormhole" keygen > "$KEY"
chmod 600 "$KEY"

for host in "$A" "$B"; do
    ip netns exec "$host" "$BIN/wormholed" -H "unix://$DIR/$host.sock" -H tcp://:9999 -K "$KEY" \
        --state-dir "$DIR/$host.state" 2> "$DIR/$host.log" &
    pids+=($!)
done
for host in "$A" "$B"; do
    for _ in $(seq 100); do wh "$host" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
say "wormholed runs on both; round trips in ms"
wh "$A" ping
wh "$A" ping 192.0.2.2

say "an echo service on $B, 127.0.0.1:7000"
ip netns exec "$B" "$PY" functional_tests/echo_server.py 127.0.0.1 7000 > "$DIR/echo.out" &
pids+=($!)
until grep -q ready "$DIR/echo.out" 2>/dev/null; do sleep 0.05; done

say "on $B: a local wormhole from :8000 to the echo service"
wh "$B" create id local url :8000 tail url :7000
send "$B" 8000 "hello through a local wormhole"

say "on $A: port 7000 reaches the echo service on $B through a remote wormhole"
wh "$A" create id far url :7000 remote 192.0.2.2
send "$A" 7000 "hello from $A through a remote wormhole"

say "what each daemon runs"
wh "$A" list
wh "$B" list

say "delete on $A removes the far half on $B too"
wh "$A" delete far
wh "$B" delete local
wh "$B" list
say "done; cleaning up"
