"""HTTPS upstreams: verification on by default, SNI, CA bundles, client certificates."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx2
import pytest
import trustme
from servers import echo_app, front, header_values, serve

from asgi_proxy_pass import ProxyPass


async def test_verified_with_ca_bundle(
    server_pem: str, ca_pem: str, client: httpx2.AsyncClient
) -> None:
    async with serve(echo_app, ssl_certfile=server_pem) as up:
        async with front(ProxyPass(up.url + "/v2/", verify=ca_pem)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 200
    assert response.json()["target"] == "/v2/x"
    assert header_values(response.json(), "x-forwarded-proto") == ["http"]


async def test_verified_with_ssl_context(
    server_pem: str, ca: trustme.CA, client: httpx2.AsyncClient
) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with serve(echo_app, ssl_certfile=server_pem) as up:
        async with front(ProxyPass(up.url + "/", verify=context)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 200


async def test_unknown_ca_is_502(
    server_pem: str, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(echo_app, ssl_certfile=server_pem) as up:
        async with front(ProxyPass(up.url + "/")) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_verify_false(server_pem: str, client: httpx2.AsyncClient) -> None:
    async with serve(echo_app, ssl_certfile=server_pem) as up:
        async with front(ProxyPass(up.url + "/", verify=False)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 200


async def test_wrong_host_name_is_502(
    ca: trustme.CA, ca_pem: str, tmp_path: Path, client: httpx2.AsyncClient
) -> None:
    pem = tmp_path / "other.pem"
    ca.issue_cert("other.example").private_key_and_cert_chain_pem.write_to_path(str(pem))
    async with serve(echo_app, ssl_certfile=str(pem)) as up:
        async with front(ProxyPass(up.url + "/", verify=ca_pem)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502


@pytest.mark.parametrize(("host", "expected"), [("localhost", "localhost"), ("127.0.0.1", None)])
async def test_sni_is_the_upstream_host(
    server_pem: str, ca_pem: str, client: httpx2.AsyncClient, host: str, expected: str | None
) -> None:
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_pem)
    context.sni_callback = lambda sock, name, ctx: names.append(name)  # type: ignore[assignment,misc]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server, front(ProxyPass(f"https://{host}:{port}/", verify=ca_pem)) as proxy:
        response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 200
    assert names == [expected]


async def test_client_certificate(
    ca: trustme.CA, server_pem: str, ca_pem: str, tmp_path: Path, client: httpx2.AsyncClient
) -> None:
    client_pem = tmp_path / "client.pem"
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(str(client_pem))
    async with serve(
        echo_app, ssl_certfile=server_pem, ssl_ca_certs=ca_pem, ssl_cert_reqs=ssl.CERT_REQUIRED
    ) as up:
        with_cert = ProxyPass(up.url + "/", verify=ca_pem, cert=str(client_pem))
        async with front(with_cert) as proxy:
            accepted = await client.get(proxy.url + "/api/x")
        async with front(ProxyPass(up.url + "/", verify=ca_pem)) as proxy:
            refused = await client.get(proxy.url + "/api/x")
    assert accepted.status_code == 200
    assert refused.status_code == 502
