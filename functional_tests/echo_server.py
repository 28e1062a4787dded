"""An echo service for tests: echoes until the client's EOF, then closes its side.

Usage: echo_server.py HOST PORT [--udp]; prints "ready" once listening.
HOST unix:/PATH or unix:@NAME (abstract; PORT ignored): a unix stream socket."""

import asyncio
import sys


async def echo(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


async def main(host, port, udp):
    if host.startswith("unix:"):
        path = host[len("unix:"):]
        await asyncio.start_unix_server(echo, "\0" + path[1:] if path.startswith("@") else path)
    elif udp:
        await asyncio.get_running_loop().create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    else:
        await asyncio.start_server(echo, host, port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), "--udp" in sys.argv))
