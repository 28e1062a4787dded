#!/usr/bin/env bash
# README example 6: a local port that, on its first connection, builds the tunnel's child on
# MYSERVER, which starts the remote mysql container on the first connection it gets.
# MYSERVER: the remote host (its wormholed shares our key; its own Docker engine runs mysql).
# The tunnel outlives the wormhole: `wormhole tunnel-delete $MYSERVER` removes it.
source "$(dirname "$0")/lib.sh"
MYSERVER=${MYSERVER:-myserver}
create url :3306 trigger tunnel $MYSERVER trigger docker-run wormhole/mysql
echo_check 3306          # the child, and the container on MYSERVER, are made now; delete removes them
wormhole list            # the tail to MYSERVER: the child's address on MYSERVER's overlay IP
wormhole tunnel-list     # the tunnel it goes through, and the wormhole using it
