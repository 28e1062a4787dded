#!/usr/bin/env bash
# README example 4: a local port to talk to a remote mysql.
# MYSERVER: the remote host (its wormholed shares our key); MYSERVER_DOCKER: its Docker
# engine for `docker -H` (default: tcp on MYSERVER like the README; tests share one engine).
source "$(dirname "$0")/lib.sh"
MYSERVER=${MYSERVER:-myserver}
DOCKER_ARGS_RM="-H ${MYSERVER_DOCKER:-$MYSERVER}"
container mysql -H "${MYSERVER_DOCKER:-$MYSERVER}" run -d wormhole/mysql
create url :3306 remote $MYSERVER tail docker-ns $mysql
echo_check 3306
