"""HTTP clients alone: CPU per 100-byte GET at 32 concurrent requests, against one URL.

The engines compared for ProxyPass, without any proxy around them:

    raw          asyncio protocol, canned request, no parsing: the floor
    httptools    H1Transport.send() (the built-in engine), reading the body to its end
    aiohttp      aiohttp.ClientSession with a proxy's settings (aiohttp_engine.py)
    httpx        httpx2.AsyncHTTPTransport (httpcore + h11)

    python benchmarks/clients.py http://127.0.0.1:PORT/small [REQUESTS]

run.py does not call this; docs/performance.md quotes it (run pinned: `taskset -c 0`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import uvloop

CONCURRENCY = 32


async def raw(url: str, n: int) -> None:
    parts = urlsplit(url)
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.waiter: asyncio.Future[None] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            # Good enough for a canned 100-byte response that comes in one piece.
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def worker(count: int) -> None:
        _, client = await loop.create_connection(Client, parts.hostname, parts.port)
        for _ in range(count):
            client.waiter = loop.create_future()
            client.transport.write(request)  # type: ignore[attr-defined]
            await client.waiter
        client.transport.close()

    await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))


async def httptools_engine(url: str, n: int) -> None:
    from asgi_proxy_pass._engine import H1Transport

    parts = urlsplit(url)
    transport = H1Transport()
    origin = ("http", parts.hostname or "", parts.port or 80)
    headers = [(b"host", parts.netloc.encode())]

    async def nobody() -> Any:
        return
        yield

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await transport.send(
                origin, b"GET", parts.path.encode(), headers, nobody(), {}
            )
            async for _ in response.stream:
                pass

    await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))
    await transport.aclose()


async def aiohttp_client(url: str, n: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=512),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    ) as session:

        async def worker(count: int) -> None:
            for _ in range(count):
                async with session.get(url, allow_redirects=False) as response:
                    await response.read()

        await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))


async def httpx_engine(url: str, n: int) -> None:
    import httpx2

    transport = httpx2.AsyncHTTPTransport(trust_env=False)

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await transport.handle_async_request(httpx2.Request("GET", url))
            await response.aread()
            await response.aclose()

    await asyncio.gather(*(worker(n // CONCURRENCY) for _ in range(CONCURRENCY)))
    await transport.aclose()


Any = object
CLIENTS: dict[str, Callable[[str, int], Awaitable[None]]] = {
    "raw": raw,
    "httptools": httptools_engine,
    "aiohttp": aiohttp_client,
    "httpx": httpx_engine,
}


async def main(url: str, n: int) -> None:
    for name, client in CLIENTS.items():
        count = n if name != "httpx" else n // 4
        await client(url, 640)  # warm up
        start, cpu = time.perf_counter(), time.process_time()
        await client(url, count)
        elapsed, used = time.perf_counter() - start, time.process_time() - cpu
        print(f"{name:10} {count / elapsed:9,.0f} req/s  {used / count * 1e6:6.1f} us CPU/request")


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20000))
