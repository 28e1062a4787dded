#!/usr/bin/env bash
# README example 5: a local port to a remote mysql, over a WireGuard tunnel to its host.
# MYSERVER: the remote host (its wormholed shares our key); MYSERVER_DOCKER: its Docker
# engine for `docker -H` (default: tcp on MYSERVER like the README; tests share one engine).
# The tunnel outlives the wormhole: `wormhole tunnel-delete $MYSERVER` removes it.
source "$(dirname "$0")/lib.sh"
MYSERVER=${MYSERVER:-myserver}
DOCKER_ARGS_RM="-H ${MYSERVER_DOCKER:-$MYSERVER}"
# mysql=`docker -H myserver run -d wormhole/mysql`
container mysql -H "${MYSERVER_DOCKER:-$MYSERVER}" run -d wormhole/mysql
create url :3306 tunnel $MYSERVER trigger docker-ns $mysql
echo_check 3306          # the child on MYSERVER listens on its overlay IP, reached through the tunnel
wormhole list            # the tail to MYSERVER: the child's address on MYSERVER's overlay IP
wormhole tunnel-list     # the tunnel it goes through, and the wormhole using it
