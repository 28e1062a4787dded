#!/usr/bin/env bash
# README example 1: proxy to the mysql in a local container.
# (The README's `docker-ns tail docker-ns` typo is fixed: `tail docker-ns`.)
source "$(dirname "$0")/lib.sh"
container mysql run -d wormhole/mysql     # mysql=`docker run -d wormhole/mysql`
create url :3306 tail docker-ns $mysql
echo_check 3306          # the stand-in mysql is an echo service
