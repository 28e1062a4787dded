"""Capture what iproute2 sends for `ip xfrm ...` commands, for test_xfrm.py to pin our messages against.

Run as root (with ip and strace): python3 unit_tests/data/xfrm_capture.py
Each command runs in a throwaway network namespace under `strace -e trace=sendmsg -xx`; the first
NETLINK_XFRM message it sends is written to xfrm_NAME.txt: the command line, the message type and
flags, and the payload after the 16-byte netlink header in hex (sequence and port differ per run).
A command the kernel refuses (a state, when the kernel has no ESP) still shows what it sent."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
NETNS = "wh-xfrm-capture"
AEAD_KEY = "0x0102030405060708090a0b0c0d0e0f1011121314"
CBC_KEY = "0x000102030405060708090a0b0c0d0e0f"
HMAC_KEY = "0x202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"

COMMANDS = [  # (name, command); in order: the deletes find what the adds made
    ("policy_add_v4", "ip xfrm policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out priority 1000"
                      " tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel"),
    ("policy_add_v6", "ip xfrm policy add src fd00:1::/64 dst fd00:2::/64 dir in priority 2000"
                      " tmpl src 2001:db8::2 dst 2001:db8::1 proto esp reqid 8 mode tunnel"),
    ("policy_add_v6_over_v4", "ip xfrm policy add src fd00:1::/64 dst fd00:2::/64 proto tcp dir fwd"
                              " tmpl src 192.0.2.2 dst 192.0.2.1 proto esp reqid 9 mode tunnel"),
    ("policy_update_v4", "ip xfrm policy update src 10.1.0.0/24 dst 10.2.0.0/24 dir out priority 1000"
                         " tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 7 mode tunnel"),
    ("policy_delete_v4", "ip xfrm policy delete src 10.1.0.0/24 dst 10.2.0.0/24 dir out"),
    ("state_add_aead", "ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000 reqid 7"
                       f" mode tunnel replay-window 32 aead rfc4106(gcm(aes)) {AEAD_KEY} 128"),
    ("state_add_aead_v6", "ip xfrm state add src 2001:db8::1 dst 2001:db8::2 proto esp spi 0x3000 reqid 8"
                          f" mode tunnel replay-window 32 aead rfc4106(gcm(aes)) {AEAD_KEY} 128"),
    ("state_update_aead", "ip xfrm state update src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000 reqid 7"
                          f" mode tunnel replay-window 32 aead rfc4106(gcm(aes)) {AEAD_KEY} 128"),
    ("state_add_cbc_hmac_encap", "ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x2000 reqid 9"
                                 f" mode tunnel replay-window 32 auth-trunc hmac(sha256) {HMAC_KEY} 128"
                                 f" enc cbc(aes) {CBC_KEY} encap espinudp 4500 4501 0.0.0.0"),
    ("state_delete", "ip xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1000"),
    ("state_flush", "ip xfrm state flush"),
]

SENT = re.compile(r'nlmsg_len=(\d+), nlmsg_type=(\w+), nlmsg_flags=([\w|]+), [^}]*\}, "((?:\\x[0-9a-f]{2})*)"')


def capture(command: str) -> tuple[int, str, str, bytes, str]:
    argv = ["ip", "netns", "exec", NETNS, "strace", "-f", "-e", "trace=sendmsg", "-s", "4096", "-xx",
            *shlex.split(command)]
    run = subprocess.run(argv, capture_output=True, text=True)
    found = SENT.search(run.stderr)
    if not found:
        sys.exit(f"no netlink message seen for: {command}\n{run.stderr}")
    length, mtype, flags, escaped = found.groups()
    payload = bytes.fromhex(escaped.replace("\\x", ""))
    answer = [line for line in run.stderr.splitlines() if not line.startswith(("sendmsg(", "+++"))]
    return int(length), mtype, flags, payload, " ".join(answer).strip() or "ok"


def main() -> None:
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    try:
        version = subprocess.run(["ip", "-V"], capture_output=True, text=True).stdout.strip()
        kernel = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
        for name, command in COMMANDS:
            length, mtype, flags, payload, answer = capture(command)
            assert length == 16 + len(payload), (name, length, len(payload))
            hexed = payload.hex()
            lines = [hexed[i:i + 64] for i in range(0, len(hexed), 64)]
            (HERE / f"xfrm_{name}.txt").write_text(
                f"# {version}, kernel {kernel}; captured by xfrm_capture.py\n"
                f"# the kernel answered: {answer}\n"
                f"command: {command}\n"
                f"type: {mtype}\n"
                f"flags: {flags}\n"
                f"length: {length}\n"
                "payload:\n" + "\n".join(lines) + "\n")
            print(f"xfrm_{name}.txt: {mtype} {length} bytes ({answer})")
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=True)


if __name__ == "__main__":
    main()
