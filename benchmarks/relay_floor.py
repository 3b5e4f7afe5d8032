"""The floor for any Python HTTP proxy on this machine: a byte relay on uvloop.

    python -m benchmarks.relay_floor --port N --upstream-port M

It does only what every HTTP-aware proxy must: finds the end of each request and
response with httptools (so upstream keep-alive connections can be reused) and relays the
bytes unchanged. No routing, no headers rewritten, no metrics, no error handling worth
the name: not a product, a measuring stick. benchmarks/overhead.py runs it with --floor
to show how much of a Python proxy's cost is Python's and the event loop's, not the
proxy's design.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque

import httptools
import uvloop


class UpstreamConn(asyncio.Protocol):
    def __init__(self, pool: deque[UpstreamConn]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client = None
        self.parser = httptools.HttpResponseParser(self)
        self.pool.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)


class ClientConn(asyncio.Protocol):
    def __init__(self, upstream_port: int, pool: deque[UpstreamConn]) -> None:
        self.upstream_port = upstream_port
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        self.pending += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        request, self.pending = bytes(self.pending), bytearray()
        if self.pool:
            self._send(self.pool.pop(), request)
        else:
            asyncio.get_running_loop().create_task(self._connect_and_send(request))

    async def _connect_and_send(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: UpstreamConn(self.pool), "127.0.0.1",
                                               self.upstream_port)
        self._send(conn, request)

    def _send(self, conn: UpstreamConn, request: bytes) -> None:
        assert conn.transport is not None
        conn.client = self.transport
        conn.transport.write(request)


async def serve(port: int, upstream_port: int) -> None:
    pool: deque[UpstreamConn] = deque()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientConn(upstream_port, pool), "127.0.0.1",
                                      port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
