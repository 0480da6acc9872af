"""The other engine considered: aiohttp's client behind httpx2's transport seam (a prototype).

Measured against the built-in httptools engine by `run.py --only ours,ours-aiohttp`; see
docs/performance.md for why it was not chosen. It skips what a proxy must not do: auto headers,
decompression, the cookie jar, URL requoting, environment proxies. It is not a complete engine
(no unix sockets, TLS options or pool timeout), just enough to measure the fast path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
from multidict import CIMultiDict
from yarl import URL


class AiohttpStream(httpx2.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        self.response.release()


class AiohttpTransport(httpx2.AsyncBaseTransport):
    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=4.0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False,
                requote_redirect_url=False,
            )
        target = request.extensions.get("target") or request.url.raw_path
        origin = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}"
        url = URL(origin + target.decode("latin-1"), encoded=True)
        headers = CIMultiDict(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
        )
        framed = "content-length" in headers or "transfer-encoding" in headers
        data: Any = None
        if framed:
            data = request.stream
        else:
            async for _ in request.stream:  # type: ignore[union-attr]
                pass  # the empty body: ProxyPass's disconnect watcher waits for its end
        seconds = request.extensions.get("timeout", {})
        response = await self.session.request(
            request.method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(
                sock_connect=seconds.get("connect"), sock_read=seconds.get("read")
            ),
        )
        return httpx2.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=AiohttpStream(response),
        )

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
