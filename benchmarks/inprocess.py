"""The proxy's own cost per request, in process: no ASGI server and no load generator.

Drives `ProxyPass` directly, with an in-memory `receive`/`send`, through 100-byte GETs to a
small upstream that runs in a subprocess (on the other core when `taskset` is there), and prints
the CPU time per request. With `--instructions` it runs itself under valgrind and prints the
user-space instructions per request instead: the same to about 0.3 % from one run to the next
on a busy machine, so that a change to the hot path can be measured where timings vary by 30 %.

    python benchmarks/inprocess.py                   # CPU us per request, median of 5 runs
    python benchmarks/inprocess.py --instructions    # instructions per request (needs valgrind)
    PYTHONPATH=/other/checkout python benchmarks/inprocess.py --instructions   # the other tree

Instructions are counted with one request at a time (`--connections 1`), the difference of two
runs of different lengths, so that start-up and warm-up cancel out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100
)

UPSTREAM = f"""
import asyncio, sys, uvloop
RESPONSE = {RESPONSE!r}
class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        count = self.buffer.count(b"\\r\\n\\r\\n")
        if count:
            self.buffer = self.buffer.rsplit(b"\\r\\n\\r\\n", 1)[1]
            self.transport.write(RESPONSE * count)
async def main():
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: str) -> list[str]:
    return ["taskset", "-c", core] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


@contextlib.contextmanager
def upstream() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen([*pinned("1"), sys.executable, "-c", UPSTREAM, str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the upstream did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(5)


async def one_request(app: Any) -> None:
    """One GET through `app`, with `receive` and `send` as uvicorn behaves."""
    done = asyncio.Event()
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/small",
        "raw_path": b"/small",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)


async def run(port: int, requests: int, connections: int, rounds: int) -> list[float]:
    """CPU us per request of each round (after a warm-up)."""
    from asgi_proxy_pass import ProxyPass

    results = []
    async with ProxyPass(f"http://127.0.0.1:{port}/") as app:
        for _ in range(200):
            await one_request(app)
        for _ in range(rounds):
            left = requests

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await one_request(app)

            started = time.process_time()
            await asyncio.gather(*(worker() for _ in range(connections)))
            results.append((time.process_time() - started) / requests * 1e6)
    return results


def instructions(port: int, requests: int) -> int:
    """User-space instructions executed by a run of `requests` requests (valgrind)."""
    result = subprocess.run(
        [
            *pinned("0"), "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, __file__, "--worker", str(port), "--requests", str(requests),
            "--connections", "1", "--rounds", "1",
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{result.stderr}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round")
    parser.add_argument("--connections", type=int, default=32, help="concurrent requests")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is printed")
    parser.add_argument("--instructions", action="store_true", help="count instructions")
    parser.add_argument("--worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import uvloop

    if args.worker:
        uvloop.run(run(args.worker, args.requests, args.connections, args.rounds))
        return
    with upstream() as port:
        if args.instructions:
            if shutil.which("valgrind") is None:
                sys.exit("valgrind is missing: apt-get install -y valgrind")
            short, long = instructions(port, 500), instructions(port, 2500)
            print(f"{(long - short) / 2000:,.0f} instructions per request")
            return
        if pinned("0"):
            os.sched_setaffinity(0, {0})
        rounds = uvloop.run(run(port, args.requests, args.connections, args.rounds))
        print(
            f"{statistics.median(rounds):.1f} us of CPU per request "
            f"(rounds: {', '.join(f'{r:.1f}' for r in rounds)})"
        )


if __name__ == "__main__":
    main()
