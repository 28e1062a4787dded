#!/bin/sh
# Builds the stand-in images the demo and the functional tests run, without any registry:
# `docker import` of a rootfs made of busybox-static (no registry is needed).
#
#   wormhole/mysql      an echo service on 0.0.0.0:3306 (nc -ll...l -p 3306 -e /bin/cat)
#   wormhole/wordpress  busybox httpd on 0.0.0.0:80; GET / connects to 127.0.0.1:3306 inside
#                       the container, sends a line and waits for its echo: 200
#                       "wordpress: database ok" when it comes back, else 503
#                       "wordpress: database unreachable". So the page works only when
#                       something (a wormhole child) provides 127.0.0.1:3306 in there.
#
# Both images carry the label wormhole.build=<sha256 of this script and busybox>; when both
# exist with the current value nothing is rebuilt. Uses $DOCKER_HOST like the docker CLI.
# Env: BUSYBOX (default /bin/busybox, from busybox-static).
set -eu

# The engine the tests' docker.from_env() uses, whatever docker context the CLI has.
export DOCKER_HOST="${DOCKER_HOST:-unix:///var/run/docker.sock}"
busybox=${BUSYBOX:-/bin/busybox}
label=wormhole.build
images="wormhole/mysql wormhole/wordpress"

[ -x "$busybox" ] || { echo "build.sh: no $busybox (install busybox-static)" >&2; exit 1; }
if command -v ldd >/dev/null && ldd "$busybox" >/dev/null 2>&1; then
    echo "build.sh: $busybox is dynamically linked; the images need busybox-static" >&2
    exit 1
fi
hash=$(cat "$0" "$busybox" | sha256sum | cut -d' ' -f1)

current() {   # true when image $1 exists with the current build label
    [ "$(docker image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null)" = "$hash" ]
}

show() {
    for image in $images; do
        echo "build.sh: $image $(docker image inspect -f '{{.Id}}' "$image")"
    done
}

uptodate=yes
for image in $images; do
    current "$image" || uptodate=no
done
if [ $uptodate = yes ]; then
    show
    exit 0
fi

old=$(docker image inspect -f '{{.Id}}' $images 2>/dev/null || true)
root=$(mktemp -d)
trap 'rm -rf "$root" "$root.tar"' EXIT
mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp" "$root/www/cgi-bin"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
# Every applet, so `docker exec CONTAINER sh` has ls, ps, ip, netstat... for debugging.
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

# httpd runs cgi-bin/index.cgi for "/" when there is no index.html.
cat >"$root/www/cgi-bin/index.cgi" <<'EOF'
#!/bin/sh
# The page needs its database: a line sent to 127.0.0.1:3306 must come back.
reply=$(echo wordpress-ping | /bin/timeout 25 /bin/nc -w 20 127.0.0.1 3306 2>/dev/null)
if [ "$reply" = wordpress-ping ]; then
    printf 'Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nwordpress: database ok\n'
else
    printf 'Status: 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nwordpress: database unreachable\n'
fi
EOF
chmod 755 "$root/www/cgi-bin/index.cgi"

tar -C "$root" -cf "$root.tar" --owner=0 --group=0 --numeric-owner .

# The server runs under a shell that exits on SIGTERM: as PID 1 the server itself would
# ignore it and `docker stop` would wait 10 s for nothing (import takes no STOPSIGNAL).
cmd() {
    printf '["/bin/sh", "-c", "trap \\"exit 0\\" TERM INT; %s & wait"]' "$*"
}
# busybox nc listens with a backlog of as many connections as it was given -l flags:
# `-ll` (serve forever) queues only 2, and a burst of concurrent connections overflows
# that queue, where the kernel can deliver a connection's FIN but not its data (seen:
# empty replies when ten clients connect while the container starts). 32 l's: 32 queued.
backlog=$(printf 'l%.0s' $(seq 32))
docker import \
    --change "LABEL $label=$hash" \
    --change 'EXPOSE 3306/tcp' \
    --change "CMD $(cmd /bin/nc -$backlog -p 3306 -e /bin/cat)" \
    "$root.tar" wormhole/mysql >/dev/null
docker import \
    --change "LABEL $label=$hash" \
    --change 'EXPOSE 80/tcp' \
    --change "CMD $(cmd /bin/httpd -f -vv -p 80 -h /www)" \
    "$root.tar" wormhole/wordpress >/dev/null
# The images these replace, unless still tagged or used by a container.
for id in $old; do
    [ -z "$(docker image inspect -f '{{join .RepoTags ""}}' "$id" 2>/dev/null)" ] &&
        docker image rm "$id" >/dev/null 2>&1 || true
done
show
