"""Captures the real wireguard-go UAPI replies in this directory (run as root: python capture_uapi.py).

Two network namespaces joined by a veth pair (192.0.2.1/24, 2001:db8::1/64 and
.2), a wireguard-go in each, configured with wgconf.uapi_set as each other's
peer; UDP echoed across the tunnel until a handshake is recorded, first over
IPv4 then over IPv6. Everything it makes is removed at the end."""

import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from wormholed.tunnels.wgconf import WgConfig, WgPeer, new_private_key, public_key, uapi_set  # noqa: E402

OUT = os.path.dirname(os.path.abspath(__file__))
NS, DEV, VETH = ("wgcapA", "wgcapB"), ("wh-capa", "wh-capb"), ("wgcv0", "wgcv1")
ECHO = ("import socket\ns=socket.socket(2,2);s.bind(('100.64.0.2',7));print('up',flush=True)\n"
        "while True:\n d,a=s.recvfrom(2000);s.sendto(d,a)")
CLIENT = ("import socket\ns=socket.socket(2,2);s.settimeout(1)\n"
          "for i in range(3):\n s.sendto(b'x'*100,('100.64.0.2',7));s.recvfrom(2000)")
HOLD_PORT = ("import socket,time\ns=socket.socket(2,2);s.bind(('',4599));print('bound',flush=True)\n"
             "time.sleep(10)")


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def uapi(dev, request):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(f"/run/wireguard/{dev}.sock")
        s.sendall(request if isinstance(request, bytes) else request.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


def save(name, text):
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text)
    print(f"--- {name}\n{text}", end="")


def setup():
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    for i, ns in enumerate(NS):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "addr", "add", f"192.0.2.{i + 1}/24", "dev", VETH[i])
        sh("ip", "-n", ns, "addr", "add", f"2001:db8::{i + 1}/64", "dev", VETH[i], "nodad")
        sh("ip", "-n", ns, "link", "set", VETH[i], "up")
        sh("ip", "netns", "exec", ns, "wireguard-go", DEV[i])
        for _ in range(50):
            if os.path.exists(f"/run/wireguard/{DEV[i]}.sock"):
                break
            time.sleep(0.1)


def configure(keys, psk, ports, hosts):
    for i in (0, 1):
        peer = WgPeer(public_key(keys[1 - i]), psk, (hosts[1 - i], ports[1 - i]), (f"100.64.0.{2 - i}/32",))
        reply = uapi(DEV[i], uapi_set(WgConfig(keys[i], ports[i], peer)))
        assert reply == "errno=0\n\n", reply
        if i == 0:
            save("uapi_set_reply_ok.txt", reply)


def exchange():
    """UDP echoed through the tunnel until wh-capa records a handshake."""
    echo = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-c", ECHO],
                            stdout=subprocess.PIPE, text=True)
    try:
        echo.stdout.readline()
        for _ in range(20):
            ok = sh("ip", "netns", "exec", NS[0], sys.executable, "-c", CLIENT, check=False).returncode == 0
            if ok and "last_handshake_time_sec=0\n" not in uapi(DEV[0], "get=1\n\n"):
                return
            time.sleep(0.5)
        raise SystemExit("no handshake")
    finally:
        echo.kill()
        echo.wait()


def port_in_use_reply():
    holder = subprocess.Popen(["ip", "netns", "exec", NS[0], sys.executable, "-c", HOLD_PORT],
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        return uapi(DEV[0], "set=1\nlisten_port=4599\n\n")
    finally:
        holder.kill()
        holder.wait()


def capture():
    setup()
    save("uapi_get_fresh.txt", uapi(DEV[0], "get=1\n\n"))
    keys, psk = (new_private_key(), new_private_key()), os.urandom(32)
    configure(keys, psk, (4500, 4501), ("192.0.2.1", "192.0.2.2"))
    save("uapi_get_no_handshake.txt", uapi(DEV[0], "get=1\n\n"))
    for i, ns in enumerate(NS):
        sh("ip", "-n", ns, "addr", "add", f"100.64.0.{i + 1}/32", "peer", f"100.64.0.{2 - i}/32", "dev", DEV[i])
        sh("ip", "-n", ns, "link", "set", DEV[i], "up")
    exchange()
    save("uapi_get_ipv4.txt", uapi(DEV[0], "get=1\n\n"))
    save("uapi_get_ipv4_far.txt", uapi(DEV[1], "get=1\n\n"))
    configure(keys, psk, (4510, 4511), ("2001:db8::1", "2001:db8::2"))
    exchange()
    save("uapi_get_ipv6.txt", uapi(DEV[0], "get=1\n\n"))
    peer_b = public_key(keys[1]).hex()
    uapi(DEV[0], f"set=1\nfwmark=4660\npublic_key={peer_b}\nallowed_ip=fd00::2/128\n\n")
    save("uapi_get_fwmark_two_allowed.txt", uapi(DEV[0], "get=1\n\n"))
    save("uapi_set_reply_unknown_key.txt", uapi(DEV[0], "set=1\nbogus_key=1\n\n"))
    save("uapi_set_reply_bad_key.txt", uapi(DEV[0], "set=1\nprivate_key=zz\n\n"))
    save("uapi_set_reply_port_in_use.txt", port_in_use_reply())


def cleanup():
    for dev in DEV:
        for pid in sh("pgrep", "-x", "-f", f"wireguard-go {dev}", check=False).stdout.split():
            os.kill(int(pid), 15)
    time.sleep(0.5)
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)
    for dev in DEV:
        if os.path.exists(f"/run/wireguard/{dev}.sock"):
            os.unlink(f"/run/wireguard/{dev}.sock")


if __name__ == "__main__":
    try:
        capture()
    finally:
        cleanup()
