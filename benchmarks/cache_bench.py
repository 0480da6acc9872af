"""Cached vs uncached throughput of a small GET through ProxyPass, in one run, on loopback.

    python benchmarks/cache_bench.py [--seconds 5] [--concurrency 32] [--upstream-delay 0]
        [--rounds 1] [--body-size 200] [--memory-size BYTES]

Three processes: an origin (uvicorn) answering `body-size` bytes with
`Cache-Control: max-age=3600`, the proxy (uvicorn, one worker) serving `/plain/` (no cache) and
`/cached/` (SQLite cache in a temporary directory, `memory_size` as given, else the default),
and this one, the load: `concurrency` keep-alive HTTP/1.1 connections sending GETs back to back
for `seconds` per case. Every request after the warm-up is a HIT. With `rounds` above 1 the
cases alternate and the medians are printed too (for a busy host). Besides requests per
second it prints the proxy process's CPU time per request (Linux), which other load on the
host disturbs less. Bounded: it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_origin(port: int, delay: float, size: int) -> None:
    import uvicorn

    body = b"x" * size

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        if delay:
            await asyncio.sleep(delay)
        await send(  # type: ignore[operator]
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"cache-control", b"max-age=3600"),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_proxy(port: int, origin: str, directory: str, memory_size: int | None) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from asgi_proxy_pass import ProxyPass
    from asgi_proxy_pass._cache import CacheConfig

    plain = ProxyPass(origin + "/")
    config = CacheConfig(path=directory)
    if memory_size is not None:
        config = CacheConfig(path=directory, memory_size=memory_size)
    cached = ProxyPass(origin + "/", cache=config)
    app = Starlette(routes=[Mount("/plain", app=plain), Mount("/cached", app=cached)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def wait_listening(port: int, deadline: float) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def one_connection(port: int, path: str, stop: float, statuses: dict[str, int]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    done = 0
    try:
        while time.monotonic() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"x-cache-status":
                    key = value.strip().decode()
                    statuses[key] = statuses.get(key, 0) + 1
            await reader.readexactly(length)
            done += 1
    finally:
        writer.close()
    return done


async def load(
    port: int, path: str, seconds: float, concurrency: int, pid: int
) -> tuple[float, float | None, dict[str, int]]:
    """Requests per second, the proxy's CPU seconds per request, the cache statuses seen."""
    statuses: dict[str, int] = {}
    await one_connection(port, path, time.monotonic() + 0.5, statuses)  # warm up, fill
    statuses.clear()
    cpu = cpu_seconds(pid)
    started = time.monotonic()
    stop = started + seconds
    counts = await asyncio.gather(
        *(one_connection(port, path, stop, statuses) for _ in range(concurrency))
    )
    elapsed, done = time.monotonic() - started, sum(counts)
    used = cpu_seconds(pid)
    per_request = (used - cpu) / done if cpu is not None and used is not None else None
    return done / elapsed, per_request, statuses


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    args: argparse.Namespace, origin_port: int, proxy_port: int, proxy_pid: int
) -> None:
    deadline = time.monotonic() + 20
    await wait_listening(origin_port, deadline)
    await wait_listening(proxy_port, deadline)
    memory = "default" if args.memory_size is None else f"{args.memory_size} B"
    print(
        f"GET of {args.body_size} B, {args.concurrency} connections, "
        f"{args.seconds:g} s per case, origin delay {args.upstream_delay:g} s, "
        f"memory_size {memory}"
    )
    rates: dict[str, list[float]] = {"plain": [], "cached": []}
    costs: dict[str, list[float]] = {"plain": [], "cached": []}
    for _ in range(args.rounds):
        for name in ("plain", "cached"):
            rate, cpu, statuses = await load(
                proxy_port, f"/{name}/item?id=1", args.seconds, args.concurrency, proxy_pid
            )
            rates[name].append(rate)
            # The proxy's CPU time per request: what a request costs it, whatever else runs
            # on the host (the load and the origin share its cores).
            cost = ""
            if cpu is not None:
                costs[name].append(cpu)
                cost = f"  proxy CPU {cpu * 1e6:4.0f} us/req"
            print(f"  {name:7} {rate:9.0f} req/s{cost}  {statuses or ''}")
        print(f"  cached / uncached: {rates['cached'][-1] / rates['plain'][-1]:.2f}x")
    if args.rounds > 1:
        plain, cached = (statistics.median(rates[name]) for name in ("plain", "cached"))
        print(f"  median of {args.rounds}: plain {plain:.0f} req/s, cached {cached:.0f} req/s,")
        line = f"    cached / uncached {cached / plain:.2f}x"
        if costs["plain"] and costs["cached"]:
            cpu_plain, cpu_cached = (statistics.median(costs[n]) * 1e6 for n in costs)
            line += f"; proxy CPU {cpu_plain:.0f} vs {cpu_cached:.0f} us/req"
        print(line)


def main(args: argparse.Namespace) -> None:
    origin_port, proxy_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    here = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as directory:
        origin = subprocess.Popen(
            [sys.executable, here, "--role", "origin", "--port", str(origin_port),
             "--upstream-delay", str(args.upstream_delay), "--body-size", str(args.body_size)],
            env=env,
        )  # fmt: skip
        proxy = subprocess.Popen(
            [sys.executable, here, "--role", "proxy", "--port", str(proxy_port),
             "--origin", f"http://127.0.0.1:{origin_port}", "--directory", directory,
             *(["--memory-size", str(args.memory_size)] if args.memory_size is not None else [])],
            env=env,
        )  # fmt: skip
        try:
            asyncio.run(measure(args, origin_port, proxy_port, proxy.pid))
        finally:
            for process in (proxy, origin):
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--upstream-delay", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--body-size", type=int, default=200)
    parser.add_argument("--memory-size", type=int)
    parser.add_argument("--role", choices=("load", "origin", "proxy"), default="load")
    parser.add_argument("--port", type=int)
    parser.add_argument("--origin")
    parser.add_argument("--directory")
    arguments = parser.parse_args()
    if arguments.role == "origin":
        serve_origin(arguments.port, arguments.upstream_delay, arguments.body_size)
    elif arguments.role == "proxy":
        serve_proxy(arguments.port, arguments.origin, arguments.directory, arguments.memory_size)
    else:
        main(arguments)
