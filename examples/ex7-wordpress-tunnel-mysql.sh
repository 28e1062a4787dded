#!/usr/bin/env bash
# README example 7: a local wordpress, started on the first connection to :80, whose
# 127.0.0.1:3306 reaches a mysql started on demand on MYSERVER, over a tunnel.
# MYSERVER: the remote host (its wormholed shares our key; its own Docker engine runs mysql).
# The tunnel outlives the wormhole: `wormhole tunnel-delete $MYSERVER` removes it.
source "$(dirname "$0")/lib.sh"
MYSERVER=${MYSERVER:-myserver}
create url :80 trigger docker-run wormhole/wordpress \
       child url :3306 tunnel $MYSERVER trigger docker-run wormhole/mysql
http_check 80 "database ok"     # both containers start now; delete removes them
wormhole list            # the tail to MYSERVER: the child's address on MYSERVER's overlay IP
wormhole tunnel-list     # the tunnel it goes through, and the wormhole using it
