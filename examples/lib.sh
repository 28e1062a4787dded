# Shared by the example scripts: run `wormhole` and `docker`, check bytes, clean up on exit.
# WORMHOLE: the CLI (default: the checkout's .venv, else `wormhole` on PATH); it talks
# to the local daemon with the default key unless WORMHOLE_HOST/WORMHOLE_KEY_FILE say otherwise.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${WORMHOLE:-}" ]; then
    WORMHOLE=$here/../.venv/bin/wormhole
    [ -x "$WORMHOLE" ] || WORMHOLE=wormhole
fi
cleanups=()
cleanup() { local i; for ((i=${#cleanups[@]}-1; i>=0; i--)); do eval "${cleanups[i]}" >/dev/null 2>&1 || true; done; }
trap cleanup EXIT
on_exit() { cleanups+=("$*"); }

wormhole() { echo "+ wormhole $*" >&2; "$WORMHOLE" "$@"; }
# create a wormhole and delete it on exit
create() { local out; out=$(wormhole create "$@"); echo "  -> $out" >&2; on_exit "$WORMHOLE delete ${out%% *}"; }
# container VAR DOCKER-ARGS...: run a docker command that prints a container id into VAR,
# and remove that container on exit (not in $(...): the cleanup must be registered here)
container() { local var=$1 id; shift; echo "+ docker $*" >&2; id=$(docker "$@")
              on_exit "docker ${DOCKER_ARGS_RM:-} rm -f $id"; printf -v "$var" %s "$id"; }

# echo_check PORT: bytes sent to 127.0.0.1:PORT come back
echo_check() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
s.sendall(b"hello mysql\n")
s.shutdown(socket.SHUT_WR)
got = s.makefile("rb").read()
print("echo:", got.decode().strip())
sys.exit(got != b"hello mysql\n")
PY
}

# http_check PORT TEXT: GET http://127.0.0.1:PORT/ answers 200 with TEXT in the page
http_check() {
    python3 - "$1" "$2" <<'PY'
import sys, urllib.request
page = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=60).read().decode()
print("page:", page.strip())
sys.exit(sys.argv[2] not in page)
PY
}

# route_check DST SRC: packets to DST leave from SRC through the tunnel: a WireGuard
# interface (wh-*), or an ipsec policy for DST
route_check() {
    local route; route=$(ip -o route get "$1")
    echo "route: $route"
    [[ " $route " == *" src $2 "* ]] || return 1
    [[ " $route " == *" dev wh-"* ]] || [ -n "$(ip xfrm policy list dst "$1" dir out)" ]
}

# ping_check DST: DST answers ping (busybox's when there is no ping on PATH)
ping_check() {
    local ping=(ping); command -v ping >/dev/null || ping=(busybox ping)
    "${ping[@]}" -c 3 -W 2 "$1"
}
