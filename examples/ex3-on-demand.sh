#!/usr/bin/env bash
# README example 3: a local port that starts wordpress, and its mysql, on the first connection.
source "$(dirname "$0")/lib.sh"
create url :80 trigger docker-run wormhole/wordpress \
       child url :3306 trigger docker-run wormhole/mysql
http_check 80 "database ok"     # both containers start now; delete removes them
