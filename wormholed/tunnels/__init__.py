"""Encrypted tunnels between wormholed daemons.

The pure core lives apart from the I/O: `ipam` picks overlay addresses, UDP
ports and interface names, and `wgconf` holds WireGuard keys and speaks the two
configuration dialects (wireguard-go's UAPI text and pyroute2's kernel
netlink arguments) as values in and values out; the modules that run
wireguard-go, bind ports and touch links build on them, so everything that can
be wrong without a kernel is tested without one."""
