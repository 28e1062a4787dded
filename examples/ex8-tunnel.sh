#!/usr/bin/env bash
# README example 8: just a tunnel. tunnel-create prints "SRC DST", the overlay IPs of this
# end and of MYSERVER's end; DST answers ping through the tunnel's interface; then the
# tunnel is deleted (both halves).
# MYSERVER: the remote host (its wormholed shares our key).
source "$(dirname "$0")/lib.sh"
MYSERVER=${MYSERVER:-myserver}
tunnel=$(wormhole tunnel-create $MYSERVER)
on_exit "$WORMHOLE tunnel-delete $MYSERVER"
echo "  -> $tunnel" >&2
read -r src dst <<<"$tunnel"
echo "tunnel: $src $dst"
route_check "$dst" "$src"  # DST is routed through the tunnel (its wh-* interface, or ipsec), from SRC
ping_check "$dst"
wormhole tunnel-delete $MYSERVER
