"""The `asgi-proxy-pass` command, run as a real process (`python -m asgi_proxy_pass`).

Upstreams run in the test's event loop, the gateway in a subprocess on a free loopback port.
Each test waits for the port with a deadline, and stops the command with a signal: a requested
stop must exit with status 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from servers import Running, read_body, serve
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from ws_servers import ws_upstream

from asgi_proxy_pass._types import ASGIApp, Receive, Scope, Send

START_DEADLINE = 20.0  # the interpreter, the imports, the spawned workers
EXIT_DEADLINE = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def connectable(port: int | None = None, uds: str | None = None) -> bool:
    try:
        if uds is not None:
            _, writer = await asyncio.open_unix_connection(uds)
        else:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@asynccontextmanager
async def command(
    *args: str, port: int | None = None, uds: str | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run the command until the block ends; the block starts once it accepts connections."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asgi_proxy_pass",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = asyncio.get_running_loop().time() + START_DEADLINE
        while not await connectable(port, uds):
            if process.returncode is not None:
                out, err = await process.communicate()
                pytest.fail(f"exited with {process.returncode}:\n{out.decode()}{err.decode()}")
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"{args} did not listen in time")
            await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.communicate()


async def stop(process: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> tuple[str, str]:
    """Signal the command; return its output once it exited with status 0."""
    process.send_signal(sig)
    out, err = await asyncio.wait_for(process.communicate(), EXIT_DEADLINE)
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def proxy_config(tmp_path: Path, listen: str, upstream: str, server: str = "") -> str:
    """A file with one location, `/`, passing to `upstream`."""
    return write_config(
        tmp_path,
        f'[server]\nlisten = "{listen}"\n{server}[locations."/"]\nproxy_pass = "{upstream}"\n',
    )


def named(name: str) -> ASGIApp:
    """An upstream that answers with its name and the path it received."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = json.dumps({"server": name, "path": scope["raw_path"].decode()}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_quick_form_round_robin(client: httpx2.AsyncClient) -> None:
    async with serve(named("a")) as a, serve(named("b")) as b:
        port = free_port()
        args = ["--listen", f"127.0.0.1:{port}", "--to", a.url, "--to", b.url]
        async with command(*args, "--prefix", "/api", "--strip-prefix", port=port) as process:
            answers = [(await client.get(f"http://127.0.0.1:{port}/api/x")).json() for _ in "ab"]
            assert sorted(answers, key=str) == [
                {"server": "a", "path": "/x"},
                {"server": "b", "path": "/x"},
            ]
            assert (await client.get(f"http://127.0.0.1:{port}/other")).status_code == 404
            out, err = await stop(process, signal.SIGINT)
    assert out.count('"GET /api/x HTTP/1.1" 200') == 2
    assert f"listening on http://127.0.0.1:{port}, 1 worker" in err


async def test_config_form_with_tls_and_an_access_log_file(
    tmp_path: Path, echo: Running, server_pem: str, ca_pem: str
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        f"""
[server]
listen = "127.0.0.1:{port}"
tls_certificate = "{server_pem}"
access_log = "logs/access.log"
access_log_format = "$scheme $request $status $upstream_addr $upstream_status"

[locations."/api/"]
proxy_pass = "{echo.url}/v2/"
""",
    )
    (tmp_path / "logs").mkdir()
    async with command("--config", config, port=port) as process:
        verify = ssl.create_default_context(cafile=ca_pem)
        async with httpx2.AsyncClient(verify=verify, trust_env=False, timeout=10) as client:
            r = await client.get(f"https://localhost:{port}/api/users?id=1")
            assert r.json()["target"] == "/v2/users?id=1"
        out, _ = await stop(process)
    assert out == ""
    upstream = echo.url.removeprefix("http://")
    assert (tmp_path / "logs" / "access.log").read_text() == (
        f"https GET /api/users?id=1 HTTP/1.1 200 {upstream} 200\n"
    )


async def check(config: str) -> tuple[int | None, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asgi_proxy_pass", "--config", config, "--check",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), START_DEADLINE)
    return process.returncode, out.decode(), err.decode()


async def test_check_runs_as_a_command(tmp_path: Path) -> None:
    good = write_config(tmp_path, '[locations."/"]\nproxy_pass = "http://127.0.0.1:9000/"\n')
    status, out, err = await check(good)
    assert status == 0, err
    assert out.splitlines()[0] == f"{good}: the configuration is valid"
    assert "    /  ->  http://127.0.0.1:9000/  /x -> /x" in out
    bad = write_config(tmp_path, '[locations."/"]\nproxy_pass = "pool"\n')
    assert await check(bad) == (
        1,
        "",
        f'asgi-proxy-pass: {bad}: [locations."/"] proxy_pass: no upstream named "pool"; '
        "expected a URL (http://...) or the name of an [upstreams.NAME] table (none defined)\n"
        f"asgi-proxy-pass: {bad}: test failed\n",
    )


async def test_an_address_in_use_exits_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = proxy_config(tmp_path, f"127.0.0.1:{port}", "http://a")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "asgi_proxy_pass", "--config", config,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), START_DEADLINE)
    assert process.returncode == 1
    assert err.decode() == (
        f"asgi-proxy-pass: {config}: [server] listen: cannot listen on 127.0.0.1:{port}: "
        "Address already in use\n"
    )


async def test_sigterm_lets_a_request_in_flight_finish(
    tmp_path: Path, client: httpx2.AsyncClient
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        arrived.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    async with serve(slow) as upstream:
        port = free_port()
        config = proxy_config(tmp_path, f"127.0.0.1:{port}", upstream.url)
        async with command("--config", config, port=port) as process:
            request = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/slow"))
            await asyncio.wait_for(arrived.wait(), 10)
            process.send_signal(signal.SIGTERM)
            for _ in range(200):  # it stops accepting at once...
                if not await connectable(port):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the gateway still accepts connections after SIGTERM")
            release.set()  # ...and the request in flight still gets its whole answer
            response = await asyncio.wait_for(request, 10)
            assert (response.status_code, response.text) == (200, "done")
            out, err = await asyncio.wait_for(process.communicate(), EXIT_DEADLINE)
            assert process.returncode == 0, err.decode()
    assert '"GET /slow HTTP/1.1" 200 4' in out.decode()


async def test_sigterm_lets_a_websocket_finish(tmp_path: Path) -> None:
    async with ws_upstream() as upstream:
        port = free_port()
        config = proxy_config(tmp_path, f"127.0.0.1:{port}", upstream.url)
        async with command("--config", config, port=port) as process:
            async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
                process.send_signal(signal.SIGTERM)
                for _ in range(200):
                    if not await connectable(port):
                        break
                    await asyncio.sleep(0.05)
                await ws.send("still there?")  # the grace period: the relay goes on
                assert await ws.recv() == "still there?"
            assert await upstream.next_close() == (1000, "")
            out, err = await asyncio.wait_for(process.communicate(), EXIT_DEADLINE)
            assert process.returncode == 0, err.decode()
    assert '"GET /ws HTTP/1.1" 101' in out.decode()


async def test_shutdown_timeout_closes_websockets_with_1012(tmp_path: Path) -> None:
    async with ws_upstream() as upstream:
        port = free_port()
        server = "shutdown_timeout = 0.2\n"
        config = proxy_config(tmp_path, f"127.0.0.1:{port}", upstream.url, server=server)
        async with command("--config", config, port=port) as process:
            async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
                process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), EXIT_DEADLINE)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1012
            assert (await upstream.next_close())[0] == 1012  # "service restart", passed on
            _, err = await asyncio.wait_for(process.communicate(), EXIT_DEADLINE)
            assert process.returncode == 0, err.decode()
    assert "shutdown_timeout (0.2s) is over; closing 1 connection(s)" in err.decode()


async def test_two_workers_on_a_unix_socket(tmp_path: Path, echo: Running) -> None:
    uds = str(tmp_path / "gw.sock")
    config = proxy_config(tmp_path, f"unix:{uds}", echo.url, server="workers = 2\n")
    async with command("--config", config, uds=uds) as process:
        transport = httpx2.AsyncHTTPTransport(uds=uds)
        async with httpx2.AsyncClient(transport=transport, trust_env=False, timeout=10) as client:
            for _ in range(4):
                assert (await client.get("http://gateway/x")).json()["target"] == "/x"
        out, err = await stop(process)
    assert "listening on unix:" in err and "2 workers" in err
    assert out.count('"GET /x HTTP/1.1" 200') == 4
    assert not await asyncio.to_thread(os.path.exists, uds)  # removed at exit


async def test_demo(client: httpx2.AsyncClient) -> None:
    port = free_port()
    async with command("demo", "--listen", f"127.0.0.1:{port}", port=port) as process:
        url = f"http://127.0.0.1:{port}"
        backends = {(await client.get(f"{url}/hello")).json()["backend"] for _ in "ab"}
        assert backends == {"a", "b"}
        async with connect(f"ws://127.0.0.1:{port}/ws", proxy=None) as ws:
            await ws.send("hi")
            assert await ws.recv() in ("a: hi", "b: hi")
        out, _ = await stop(process)
    assert f"curl -i {url}/hello" in out
    assert out.count('"GET /hello HTTP/1.1" 200') == 2
