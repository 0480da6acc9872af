"""The transport seam: `transport=` is used as is, and conditions a real upstream cannot produce."""

from __future__ import annotations

import httpx2
import pytest
import respx
from servers import front

from asgi_proxy_pass import ProxyPass


async def test_pool_timeout_is_503(client: httpx2.AsyncClient) -> None:
    router = respx.Router()
    router.get("http://b:1/x").mock(side_effect=httpx2.PoolTimeout("no free connection"))
    proxy = ProxyPass("http://b:1/", transport=httpx2.MockTransport(router.async_handler))
    async with front(proxy) as running:
        response = await client.get(running.url + "/api/x")
    assert response.status_code == 503
    assert response.text == "503 Service Unavailable\n"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (httpx2.ConnectTimeout("slow"), 504),
        (httpx2.WriteTimeout("slow"), 504),
        (httpx2.ConnectError("refused"), 502),
        (httpx2.RemoteProtocolError("bad"), 502),
        (httpx2.UnsupportedProtocol("h9"), 502),
    ],
)
async def test_error_table(client: httpx2.AsyncClient, error: Exception, status: int) -> None:
    router = respx.Router()
    router.route().mock(side_effect=error)
    proxy = ProxyPass("http://b:1/", transport=httpx2.MockTransport(router.async_handler))
    async with front(proxy) as running:
        response = await client.get(running.url + "/api/x")
    assert response.status_code == status


async def test_given_transport_is_used_and_not_closed(client: httpx2.AsyncClient) -> None:
    router = respx.Router()
    route = router.get("http://b:1/v2/x", params={"q": "1"}).respond(201, text="mocked")
    transport = httpx2.MockTransport(router.async_handler)
    closed = []

    async def aclose() -> None:
        closed.append(True)

    transport.aclose = aclose  # type: ignore[method-assign]
    proxy = ProxyPass("http://b:1/v2/", transport=transport)
    async with front(proxy) as running:
        response = await client.get(running.url + "/api/x?q=1")
    assert response.status_code == 201
    assert response.text == "mocked"
    assert route.call_count == 1
    assert route.calls.last.request.headers["host"] == "b:1"
    assert proxy.transport_for(proxy.pool.servers[0]) is transport
    assert closed == []
