#!/usr/bin/env python3
"""Plain TCP in, TLS out: lets the kosoku runner (built without TLS) test Parlor's wss://.

Usage: tls_bridge.py TARGET_HOST:PORT CA_FILE
Listens on 127.0.0.1 on a free port, prints "bridge listening on 127.0.0.1:PORT", and for each
connection opens a TLS connection to TARGET (verifying it against CA_FILE, name "localhost")
and copies bytes both ways unchanged. Every WebSocket frame of the run therefore goes through
Parlor's TLS layer; the bridge itself only moves bytes. When either side ends, the other side
gets an EOF (TLS: close_notify), so closing-handshake cases see the server's close as it is.
"""

import asyncio
import ssl
import sys


async def pipe(reader, writer, eof):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        try:
            if eof and writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
        except (ConnectionError, OSError, ssl.SSLError, RuntimeError):
            pass


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=sys.argv[2])

    async def handle(c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname="localhost"
            )
        except (OSError, ssl.SSLError) as e:
            print(f"bridge: cannot reach {host}:{port}: {e}", file=sys.stderr)
            c_writer.close()
            return
        # Client to server: a half-close from the client becomes close_notify; server to
        # client: the server's end becomes FIN on the plain side.
        await asyncio.gather(
            pipe(c_reader, s_writer, eof=False),
            pipe(s_reader, c_writer, eof=True),
        )
        for w in (c_writer, s_writer):
            try:
                w.close()
            except (OSError, RuntimeError):
                pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()
    print(f"bridge listening on {addr[0]}:{addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
