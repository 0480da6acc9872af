"""Faulty upstreams: each misbehaviour gets the right outcome, a log line, and the proxy keeps
serving the next request."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import httpx2
import pytest
import trustme
from faulty import close, drip, faulty, hang, read_body, read_head, reset, send
from servers import echo_app, front, serve

from asgi_proxy_pass import ProxyPass

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def still_serving(client: httpx2.AsyncClient, url: str) -> None:
    """The proxy answers the next request normally (a well-behaved upstream on another path)."""
    async with serve(echo_app) as good, front(ProxyPass(good.url + "/")) as proxy:
        assert (await client.get(proxy.url + "/api/next")).status_code == 200


@pytest.mark.parametrize(
    ("script", "status", "logged"),
    [
        # Accepts and never answers: a read timeout.
        ((read_head(), hang()), 504, "ReadTimeout"),
        # Closes before any response: nginx "upstream prematurely closed connection".
        ((read_head(), close()), 502, "Server disconnected"),
        # Resets the connection before any response.
        ((read_head(), reset()), 502, "failed"),
        # Invalid status line.
        ((read_head(), send(b"HTTP/1.1 OK\r\n\r\n"), close()), 502, "failed"),
        ((read_head(), send(b"garbage\r\n\r\n"), close()), 502, "failed"),
        # Invalid header bytes.
        ((read_head(), send(b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n"), close()), 502, "failed"),
        ((read_head(), send(b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n"), close()), 502, "failed"),
        # Conflicting framing (nginx >= 1.23 answers 502 too).
        (
            (
                read_head(),
                send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"),
                close(),
            ),
            502,
            "failed",
        ),
        # Both Content-Length and Transfer-Encoding: a smuggling vector.
        (
            (
                read_head(),
                send(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n"
                ),
                close(),
            ),
            502,
            "both Content-Length and Transfer-Encoding",
        ),
        # An unknown transfer coding.
        (
            (read_head(), send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc"), close()),
            502,
            "failed",
        ),
        # Headers that drip slower than the read timeout allows between two reads.
        ((read_head(), drip(b"HTTP/1.1 200 OK\r\n", 0.5)), 504, "ReadTimeout"),
    ],
)
async def test_bad_upstream_before_the_response(
    client: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    script: tuple[object, ...],
    status: int,
    logged: str,
) -> None:
    async with faulty(*script) as up:  # type: ignore[arg-type]
        async with front(ProxyPass(up.url + "/", timeout=0.3)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == status
    assert logged in caplog.text
    assert "asgi_proxy_pass" in [r.name for r in caplog.records]
    await still_serving(client, "")


@pytest.mark.parametrize(
    "script",
    [
        # Content-Length larger than the body, then close.
        (read_head(), send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), close()),
        # Reset mid-body.
        (read_head(), send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), reset()),
        # Bad chunk size.
        (
            read_head(),
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"),
            close(),
        ),
        # Chunked body that just stops.
        (
            read_head(),
            send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc"),
            close(),
        ),
        # Headers, then silence past the read timeout.
        (read_head(), send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"), hang()),
    ],
)
async def test_truncated_body_is_never_presented_as_complete(
    client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture, script: tuple[object, ...]
) -> None:
    async with faulty(*script) as up:  # type: ignore[arg-type]
        async with front(ProxyPass(up.url + "/", timeout=0.3)) as proxy:
            with pytest.raises(httpx2.TransportError):
                async with client.stream("GET", proxy.url + "/api/x") as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_raw():
                        pass
    assert "aborted the client connection" in caplog.text
    await still_serving(client, "")


async def test_interim_responses_are_skipped(client: httpx2.AsyncClient) -> None:
    script = (
        read_head(),
        send(b"HTTP/1.1 100 Continue\r\n\r\n"),
        send(b'HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel="preload"\r\n\r\n'),
        send(OK),
    )
    async with faulty(*script) as up, front(ProxyPass(up.url + "/")) as proxy:
        response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 200
    assert response.text == "ok"


async def test_response_before_the_request_body_was_read(client: httpx2.AsyncClient) -> None:
    # The upstream refuses the upload from its headers alone and closes.
    refusal = (
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
    )
    async with faulty(read_head(), send(refusal), close()) as up:
        async with front(ProxyPass(up.url + "/")) as proxy:
            response = await client.post(proxy.url + "/api/upload", content=b"x" * 1000)
    assert response.status_code == 413
    assert response.text == "big!"


async def test_body_reaches_upstream_byte_for_byte(client: httpx2.AsyncClient) -> None:
    payload = bytes(range(256)) * 64
    async with faulty(read_head(), read_body(len(payload)), send(OK)) as up:
        async with front(ProxyPass(up.url + "/")) as proxy:
            response = await client.post(proxy.url + "/api/u", content=payload)
    assert response.status_code == 200
    assert up.bodies == [payload]
    assert b"content-length: 16384\r\n" in up.heads[0].lower()


def issue(ca: trustme.CA, tmp_path: Path, name: str, **kw: datetime.datetime) -> str:
    path = tmp_path / f"{name}.pem"
    ca.issue_cert(name, **kw).private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("fault", ["wrong_host", "expired"])
async def test_bad_tls_certificates_are_502(
    ca: trustme.CA,
    ca_pem: str,
    tmp_path: Path,
    client: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    if fault == "wrong_host":
        pem = issue(ca, tmp_path, "other.example")
    else:
        past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
        pem = issue(
            ca, tmp_path, "127.0.0.1", not_before=past, not_after=past + datetime.timedelta(1)
        )
    async with serve(echo_app, ssl_certfile=pem) as up:
        async with front(ProxyPass(up.url + "/", verify=ca_pem)) as proxy:
            response = await client.get(proxy.url + "/api/x")
    assert response.status_code == 502
    expected = "IP address mismatch" if fault == "wrong_host" else "certificate has expired"
    assert expected in caplog.text
    assert isinstance(ssl.OPENSSL_VERSION, str)
