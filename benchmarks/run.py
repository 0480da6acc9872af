"""Benchmark ProxyPass against nginx `proxy_pass`, asgiproxy and the backend itself, in one run.

    python benchmarks/run.py                   # about 5 minutes on 2 cores
    python benchmarks/run.py --quick           # one short round, to try the setup
    python benchmarks/run.py --engines         # also ProxyPass on httpx2 and on aiohttp

Everything listens on 127.0.0.1. Each proxy runs alone on core 0 (`taskset -c 0`): ours and
asgiproxy under one uvicorn worker (uvloop, httptools), nginx with one worker. The backends
(nginx for the GETs, backend.py for uploads and WebSocket echo) and the load generators (wrk,
curl, wsload.py) share core 1. Every figure is the median of `--repeat` rounds; rounds visit the
targets in turn, so that drift hits all of them alike.

Measured, per target:
    small GET      wrk, 32 connections, a 100-byte file: req/s, p50 and p99 latency, and the
                   proxy process's CPU time (user + system) per request
    1 MiB GET      wrk, 8 connections: MiB/s
    200 MiB GET    curl, one download: MiB/s, and the proxy's RSS growth (peak during the
                   transfer minus RSS before); again with curl reading at 100 MiB/s (slow reader)
    50 MiB upload  curl, one POST with Content-Length: MiB/s and RSS growth
    WebSocket      wsload.py, 64-byte messages echoed: round trips/s on 1 and 32 connections
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
PROXY_CORE, LOAD_CORE = "0", "1"
#: Downloads of 200 MiB and uploads of 50 MiB per round, of which the median counts.
TRANSFERS = 5

NGINX_BACKEND = """
user root;
worker_processes 1;
pid {dir}/backend.pid;
error_log {dir}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
    }}
}}
"""

# A streaming proxy like ours: no request or response buffering to disk.
NGINX_PROXY = """
user root;
worker_processes 1;
pid {dir}/proxy.pid;
error_log {dir}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    upstream static {{ server 127.0.0.1:{static}; keepalive 128; }}
    upstream dynamic {{ server 127.0.0.1:{dynamic}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_buffering off;
        proxy_request_buffering off;
        location / {{
            proxy_set_header Connection "";
            proxy_pass http://static;
        }}
        location = /upload {{
            proxy_set_header Connection "";
            proxy_pass http://dynamic;
        }}
        location /ws {{
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 600s;
            proxy_pass http://dynamic;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {seconds}s: {process.args!r}")


class Target:
    """A proxy (or the backend itself) under test, and the process whose CPU and RSS count."""

    def __init__(self, name: str, port: int, static_port: int, dynamic_port: int) -> None:
        self.name = name
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.static_url = f"http://127.0.0.1:{port if port else static_port}"
        self.dynamic_url = f"http://127.0.0.1:{port if port else dynamic_port}"

    @property
    def measured_pid(self) -> int | None:
        if self.process is None:
            return None
        if self.name != "nginx":
            return self.process.pid
        # nginx: the one worker, not the master.
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return int(children.read_text().split()[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@contextlib.contextmanager
def rss_growth(pid: int | None, out: dict[str, float], key: str) -> Iterator[None]:
    """Peak RSS during the block minus RSS before it, in MiB (the kernel's high-water mark)."""
    if pid is None:
        yield
        return
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib(pid)
    yield
    out[key] = (rss_kib(pid, "VmHWM") - before) / 1024


def load(*command: str) -> str:
    result = subprocess.run(
        ["taskset", "-c", LOAD_CORE, *command], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed: {result.stderr or result.stdout}")
    return result.stdout


def seconds_of(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def wrk(url: str, connections: int, duration: float) -> dict[str, float]:
    out = load(
        "wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s", url
    )
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors for {url}:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return {
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50": seconds_of(latency["50"]) * 1000,
        "p99": seconds_of(latency["99"]) * 1000,
    }


def curl(*args: str) -> float:
    """curl's average speed of the transfer, in MiB/s."""
    out = load("curl", "-sS", "-o", "/dev/null", "--fail", *args)
    return float(out) / MiB


def measure(target: Target, duration: float) -> dict[str, float]:
    pid = target.measured_pid
    static, dynamic = target.static_url, target.dynamic_url
    result: dict[str, float] = {}

    wrk(static + "/small", 32, 1)  # warm up: connections, pools, caches
    before = cpu_seconds(pid) if pid else 0.0
    small = wrk(static + "/small", 32, duration)
    if pid:
        result["cpu_us"] = (cpu_seconds(pid) - before) / small["requests"] * 1e6
    result.update(rps=small["rps"], p50=small["p50"], p99=small["p99"])

    result["get_1m"] = wrk(static + "/1m", 8, duration)["rps"]
    # A transfer takes a fraction of a second: the median of a few, so that one hiccup of the
    # shared machine does not decide the figure.
    with rss_growth(pid, result, "rss_200m"):
        result["get_200m"] = statistics.median(
            curl("-w", "%{speed_download}", static + "/200m") for _ in range(TRANSFERS)
        )
    with rss_growth(pid, result, "rss_200m_slow"):
        curl("--limit-rate", "100M", "-w", "%{speed_download}", static + "/200m")
    upload = (
        "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
        "--data-binary", f"@{WORK}/upload.bin", "-w", "%{speed_upload}", dynamic + "/upload",
    )  # fmt: skip
    with rss_growth(pid, result, "rss_upload"):
        result["upload_50m"] = statistics.median(curl(*upload) for _ in range(TRANSFERS))
    ws = dynamic.replace("http://", "ws://") + "/ws"
    result["ws_1"] = float(load(sys.executable, str(HERE / "wsload.py"), ws, "1", str(duration)))
    result["ws_32"] = float(load(sys.executable, str(HERE / "wsload.py"), ws, "32", str(duration)))
    return result


WORK = Path()
#: The servers' stderr, kept after the run.
LOG = Path(tempfile.gettempdir()) / "asgi-proxy-pass-bench.log"

ROWS: list[tuple[str, str, str, Callable[[float], str]]] = [
    # key, label, unit, format
    ("rps", "small GET", "req/s", lambda v: f"{v:,.0f}"),
    ("p50", "small GET p50", "ms", lambda v: f"{v:.2f}"),
    ("p99", "small GET p99", "ms", lambda v: f"{v:.2f}"),
    ("cpu_us", "CPU per small GET", "us", lambda v: f"{v:.0f}"),
    ("get_1m", "1 MiB GET", "MiB/s", lambda v: f"{v:,.0f}"),
    ("get_200m", "200 MiB GET", "MiB/s", lambda v: f"{v:,.0f}"),
    ("rss_200m", "RSS growth, 200 MiB GET", "MiB", lambda v: f"{v:.1f}"),
    ("rss_200m_slow", "RSS growth, same, slow reader", "MiB", lambda v: f"{v:.1f}"),
    ("upload_50m", "50 MiB upload", "MiB/s", lambda v: f"{v:,.0f}"),
    ("rss_upload", "RSS growth, 50 MiB upload", "MiB", lambda v: f"{v:.1f}"),
    ("ws_1", "WebSocket echo, 1 connection", "round trips/s", lambda v: f"{v:,.0f}"),
    ("ws_32", "WebSocket echo, 32 connections", "round trips/s", lambda v: f"{v:,.0f}"),
]

# (key, reference, at least (or at most, if negative) this ratio of ours to the reference)
GOALS = [
    ("rps", "asgiproxy", 2.0),
    ("p99", "asgiproxy", -1.0),
    ("get_1m", "nginx", 1.0),
    ("get_200m", "nginx", 1.0),
    ("upload_50m", "nginx", 1.0),
    ("ws_32", "nginx", 1.0),
    ("ws_1", "nginx", 0.8),
]


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    refs = [n for n in ("asgiproxy", "nginx") if n in results and "ours" in results]
    header = ["", "unit", *names, *(f"ours / {r}" for r in refs)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key, label, unit, fmt in ROWS:
        cells = [label, unit]
        for name in names:
            value = results[name].get(key)
            cells.append("" if value is None else fmt(value))
        for ref in refs:
            ours, theirs = results["ours"].get(key), results[ref].get(key)
            # A ratio to a figure that prints as 0.0 (nginx's RSS growth) would mean nothing.
            if ours is not None and theirs is not None and abs(theirs) >= 0.05:
                cells.append(f"{ours / theirs:.2f}x")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(results: dict[str, dict[str, float]]) -> str:
    lines = []
    ours = results.get("ours", {})
    for key, ref, ratio in GOALS:
        if ref not in results or key not in ours:
            continue
        got = ours[key] / results[ref][key]
        met = got <= -ratio if ratio < 0 else got >= ratio
        want = f"<= {-ratio:.1f}x" if ratio < 0 else f">= {ratio:.1f}x"
        lines.append(f"{'met ' if met else 'MISSED'}  {key} {want} {ref}: {got:.2f}x")
    if "cpu_us" in ours:
        met = ours["cpu_us"] <= 70
        lines.append(f"{'met ' if met else 'MISSED'}  cpu_us <= 70: {ours['cpu_us']:.0f} us")
    for key in ("rss_200m", "rss_200m_slow", "rss_upload"):
        if key in ours:
            met = ours[key] < 10
            lines.append(f"{'met ' if met else 'MISSED'}  {key} < 10 MiB: {ours[key]:.1f} MiB")
    return "\n".join(lines)


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=open(LOG, "ab"),  # noqa: SIM115
        start_new_session=True,
    )


def uvicorn(app: str, port: int) -> list[str]:
    return [
        "taskset", "-c", PROXY_CORE, sys.executable, "-m", "uvicorn", app,
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


def main() -> None:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk/ws run")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s runs")
    parser.add_argument("--engines", action="store_true", help="also ours on httpx and aiohttp")
    parser.add_argument("--only", help="comma-separated targets, e.g. ours,nginx")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.duration = 1, 2.0
    for tool in ("nginx", "wrk", "curl", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install -y nginx wrk curl util-linux")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores: one for the proxy, one for the backends and load")

    names = ["ours", "asgiproxy", "nginx", "direct"]
    if args.engines:
        names[1:1] = ["ours-httpx", "ours-aiohttp"]
    if args.only:
        names = [n for n in args.only.split(",") if n]

    WORK = Path(tempfile.mkdtemp(prefix="asgi-proxy-pass-bench-"))
    LOG.write_bytes(b"")
    www = WORK / "www"
    www.mkdir()
    (www / "small").write_bytes(b"x" * 100)
    (www / "1m").write_bytes(os.urandom(MiB))
    (www / "200m").write_bytes(os.urandom(MiB) * 200)
    (WORK / "upload.bin").write_bytes(os.urandom(MiB) * 50)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        static_port, dynamic_port = free_port(), free_port()
        conf = WORK / "backend.conf"
        conf.write_text(NGINX_BACKEND.format(dir=WORK, port=static_port))
        for command, port in (
            (["nginx", "-p", str(WORK), "-c", str(conf), "-g", "daemon off;"], static_port),
            ([sys.executable, str(HERE / "backend.py"), str(dynamic_port)], dynamic_port),
        ):
            processes.append(start(["taskset", "-c", LOAD_CORE, *command]))
            wait_listening(port, processes[-1])

        targets: list[Target] = []
        for name in names:
            port = 0 if name == "direct" else free_port()
            target = Target(name, port, static_port, dynamic_port)
            env = {
                "BENCH_STATIC": f"http://127.0.0.1:{static_port}",
                "BENCH_DYNAMIC": f"http://127.0.0.1:{dynamic_port}",
            }
            if name == "nginx":
                conf = WORK / "proxy.conf"
                conf.write_text(
                    NGINX_PROXY.format(
                        dir=WORK, port=port, static=static_port, dynamic=dynamic_port
                    )
                )
                command = ["taskset", "-c", PROXY_CORE, "nginx", "-p", str(WORK), "-c", str(conf)]
                target.process = start([*command, "-g", "daemon off;"])
            elif name == "asgiproxy":
                target.process = start(uvicorn("apps:asgiproxy", port), env)
            elif name.startswith("ours"):
                env["BENCH_ENGINE"] = name.partition("-")[2] or "httptools"
                target.process = start(uvicorn("apps:ours", port), env)
            if target.process is not None:
                processes.append(target.process)
                wait_listening(port, target.process)
            targets.append(target)

        rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
        for round_ in range(args.repeat):
            for target in targets:
                print(f"round {round_ + 1}/{args.repeat}: {target.name}", file=sys.stderr)
                rounds[target.name].append(measure(target, args.duration))
        results = {
            name: {
                key: statistics.median(r[key] for r in runs)
                for key in runs[0]
                if all(key in r for r in runs)
            }
            for name, runs in rounds.items()
        }
        print(f"\n{os.cpu_count()} cores, {args.repeat} round(s) of {args.duration:g} s runs\n")
        print(table(results))
        print()
        print(goals(results))
    finally:
        for process in reversed(processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
