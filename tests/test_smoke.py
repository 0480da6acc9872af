from __future__ import annotations

import httpx2
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_proxy_pass import ProxyPass
from servers import Running, serve


async def test_smoke(echo: Running, client: httpx2.AsyncClient) -> None:
    proxy = ProxyPass(echo.url + "/v2/")
    app = Starlette(routes=[Mount("/api", app=proxy)])
    async with serve(app) as front:
        r = await client.get(front.url + "/api/users?id=10")
        print(r.json())
        assert r.json()["target"] == "/v2/users?id=10"
    await proxy.aclose()
