"""Soak run: load, faults and churn through the proxy, then check that nothing leaked.

    python benchmarks/soak.py            # small mode: 2,000 requests, well under a minute
    python benchmarks/soak.py --long     # 20,000 requests at 64 concurrency

Everything runs on 127.0.0.1. Three processes: the upstreams (two good uvicorn servers and a
"hangup" server that accepts and closes without answering, about 5% of the pool's weight), the
proxy (uvicorn running `ProxyPass` over an `Upstream` pool, under `-W error::ResourceWarning`
and asyncio debug mode), and this load generator. The mix: small GETs, POSTs, streamed GETs of
which the client drops 10% mid-response, and WebSockets opening and closing alongside.

Bars, checked at the end (exit status 1 and a line per failure if any is missed):
- every request completes or fails with the status its kind allows, within its timeout;
- the proxy's RSS grows by less than 20 MiB after warm-up;
- once idle, the proxy holds no more file descriptors than before the run (no upstream
  connection, no client socket left open);
- the proxy's stderr has no "Task was destroyed", unclosed-resource warning or traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from websockets.asyncio.client import connect

HERE = str(Path(__file__).resolve())
ROOT = Path(HERE).parent.parent
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The upstream and proxy processes.


def serve_upstreams(ports: list[int], hangup_port: int) -> None:
    import uvicorn

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": message.get("text") or ""})
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":
            for _ in range(32):
                await send({"type": "http.response.body", "body": b"x" * 16384, "more_body": True})
                await asyncio.sleep(0.002)
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body", "body": b"ok:%d" % len(body)})

    async def hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def main() -> None:
        # uvicorn's servers handle SIGTERM themselves and return.
        servers = [
            uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off")
            )
            for port in ports
        ]
        bad = await asyncio.start_server(hangup, "127.0.0.1", hangup_port)
        async with bad:
            await asyncio.gather(*(server.serve() for server in servers))

    asyncio.run(main())


def proxy_app(ports: list[int], hangup_port: int):  # type: ignore[no-untyped-def]
    from asgi_proxy_pass import ProxyPass, Server, Upstream

    pool = Upstream(
        [Server(f"http://127.0.0.1:{port}", weight=10) for port in ports]
        + [Server(f"http://127.0.0.1:{hangup_port}", weight=1, max_fails=0)],
        **({"engine": os.environ["SOAK_ENGINE"]} if "SOAK_ENGINE" in os.environ else {}),
    )
    return ProxyPass(pool)


def serve_proxy(port: int, ports: list[int], hangup_port: int) -> None:
    import uvicorn

    uvicorn.run(
        proxy_app(ports, hangup_port),
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="on",
        server_header=False,
        date_header=False,
    )


# The load.


class Tally:
    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def fail(self, message: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(message)
        self.outcomes["unexpected"] += 1


async def one_request(client: httpx2.AsyncClient, base: str, rng: random.Random, t: Tally) -> None:
    kind = rng.random()
    try:
        async with asyncio.timeout(30):
            if kind < 0.1:
                # A streamed download the client drops after the first chunk.
                async with client.stream("GET", base + "/stream") as response:
                    async for _ in response.aiter_raw():
                        break
                t.outcomes["dropped stream"] += 1
            elif kind < 0.2:
                response = await client.post(base + "/post", content=b"p" * 300)
                # A POST that reached the hangup server is not retried: 502 is its right answer.
                if response.status_code == 200 and response.text == "ok:300":
                    t.outcomes["post 200"] += 1
                elif response.status_code == 502:
                    t.outcomes["post 502"] += 1
                else:
                    t.fail(f"POST -> {response.status_code} {response.text[:40]!r}")
            else:
                response = await client.get(base + "/small")
                if response.status_code == 200 and response.text == "ok:0":
                    t.outcomes["get 200"] += 1  # a GET is retried past the hangup server
                else:
                    t.fail(f"GET -> {response.status_code} {response.text[:40]!r}")
    except TimeoutError:
        t.fail("a request hung for 30 s")
    except httpx2.HTTPError as exc:
        t.fail(f"{type(exc).__name__}: {exc}")


async def websockets_churn(url: str, stop: asyncio.Event, t: Tally) -> None:
    while not stop.is_set():
        try:
            async with asyncio.timeout(10):
                async with connect(url, proxy=None) as ws:
                    await ws.send("ping")
                    if await ws.recv() == "ping":
                        t.outcomes["websocket"] += 1
                    else:
                        t.fail("WebSocket echo mismatch")
        except Exception as exc:  # noqa: BLE001 - any failure is a finding to report
            # A handshake that reached the hangup server fails over; anything else is a finding.
            t.fail(f"WebSocket: {type(exc).__name__}: {exc}")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Processes:
    """The upstreams and the proxy, started before the load and stopped after it."""

    def __init__(self) -> None:
        self.ports = [free_port(), free_port()]
        self.hangup_port, self.proxy_port = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = tempfile.TemporaryFile(mode="w+")
        upstream_args = [*map(str, self.ports), str(self.hangup_port)]
        self.upstreams = subprocess.Popen(
            [sys.executable, HERE, "--serve-upstreams", *upstream_args], env=env
        )
        self.proxy = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "error::ResourceWarning",
                HERE,
                "--serve-proxy",
                str(self.proxy_port),
                *upstream_args,
            ],
            env={**env, "PYTHONASYNCIODEBUG": "1"},
            stderr=self.log,  # a file, not a pipe: a full pipe would block the proxy's logging
        )

    def stop(self) -> tuple[list[str], str]:
        """Stop both; the problems seen while stopping, and the proxy's stderr."""
        problems = []
        self.proxy.send_signal(signal.SIGINT)
        try:
            self.proxy.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proxy.kill()
            self.proxy.wait()
            problems.append("the proxy did not stop on SIGINT within 15 s")
        self.upstreams.send_signal(signal.SIGTERM)
        try:
            self.upstreams.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.upstreams.kill()
        self.log.seek(0)
        stderr = self.log.read()
        self.log.close()
        for marker in ("Task was destroyed", "ResourceWarning", "unclosed", "Traceback"):
            if marker in stderr:
                problems.append(f"proxy stderr has {marker!r}")
        return problems, stderr


async def load(processes: Processes, requests: int, concurrency: int) -> list[str]:
    """Run the load; the bars it missed."""
    proxy = processes.proxy
    tally = Tally()
    problems: list[str] = []
    deadline = time.monotonic() + 20
    for port in (*processes.ports, processes.proxy_port):
        await wait_for_port(port, deadline)
    base = f"http://127.0.0.1:{processes.proxy_port}"
    idle_fds = fds(proxy.pid)
    rng = random.Random(1)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded() -> None:
            async with semaphore:
                await one_request(client, base, rng, tally)

        warm_up = max(requests // 10, 100)
        await asyncio.gather(*(bounded() for _ in range(warm_up)))
        rss_after_warm_up = rss(proxy.pid)
        peak = rss_after_warm_up
        stop = asyncio.Event()
        churn = asyncio.create_task(
            websockets_churn(base.replace("http", "ws", 1) + "/ws", stop, tally)
        )
        started = time.monotonic()
        tasks = [asyncio.create_task(bounded()) for _ in range(requests - warm_up)]
        ticks = 0
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0.2)
            peak = max(peak, rss(proxy.pid))
            ticks += 1
            if ticks % 25 == 0:
                done = sum(task.done() for task in tasks)
                print(f"  ... {done + warm_up} of {requests} done", file=sys.stderr)
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        stop.set()
        await churn
    growth = peak - rss_after_warm_up
    # Idle: upstream keep-alive connections expire after 4 s (DEFAULT_LIMITS).
    await asyncio.sleep(5)
    left = fds(proxy.pid)
    print(f"requests: {requests} at concurrency {concurrency} in {elapsed:.1f} s")
    for outcome, count in sorted(tally.outcomes.items()):
        print(f"  {outcome:16} {count}")
    print(
        f"proxy RSS: {rss_after_warm_up / MiB:.1f} MiB after warm-up, "
        f"peak {peak / MiB:.1f} MiB (growth {growth / MiB:.1f} MiB)"
    )
    print(f"proxy file descriptors: {idle_fds} before, {left} after idling")
    problems += tally.failures
    if growth >= 20 * MiB:
        problems.append(f"RSS grew by {growth / MiB:.1f} MiB (bar: 20 MiB)")
    if left > idle_fds:
        problems.append(f"{left - idle_fds} file descriptors left open")
    return problems


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="20,000 requests instead of 2,000")
    parser.add_argument("--requests", type=int, help="number of HTTP requests")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-upstreams", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-proxy", nargs="+", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstreams:
        *ports, hangup_port = args.serve_upstreams
        serve_upstreams(ports, hangup_port)
        return 0
    if args.serve_proxy:
        port, *ports, hangup_port = args.serve_proxy
        serve_proxy(port, ports, hangup_port)
        return 0
    requests = args.requests or (20_000 if args.long else 2_000)
    processes = Processes()
    try:
        problems = asyncio.run(load(processes, requests, args.concurrency))
    finally:
        stopping, stderr = processes.stop()
    problems += stopping
    if problems:
        print("FAILED:")
        for problem in problems:
            print(f"  {problem}")
        if stderr.strip():
            print("proxy stderr (last lines):", *stderr.strip().splitlines()[-15:], sep="\n  ")
        return 1
    print("all bars met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
