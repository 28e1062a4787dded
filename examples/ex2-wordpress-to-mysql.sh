#!/usr/bin/env bash
# README example 2: connect a local wordpress container to a local mysql container.
source "$(dirname "$0")/lib.sh"
container app run -d wormhole/wordpress  # app=`docker run -d wormhole/wordpress`
container mysql run -d wormhole/mysql    # mysql=`docker run -d wormhole/mysql`
create url :3306 docker-ns $app tail docker-ns $mysql
# To look at the page, a second wormhole brings the app's port 80 to this host's 8080.
create url :8080 tail docker-ns $app url :80
http_check 8080 "database ok"   # served only if 127.0.0.1:3306 inside the app answers
