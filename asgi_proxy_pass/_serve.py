"""Serving a gateway with uvicorn: the listening socket, logging, workers and a graceful stop.

    serve(built)
      bind [server] listen          ourselves, so that "address in use" is a config error (exit
                                    1) and the socket is TCP (asyncio sets TCP_NODELAY then)
      workers = 1                   GatewayServer in this process
      workers = N                   N spawned processes, each rebuilding the app from the
                                    config's data; this one restarts any that dies and passes
                                    SIGTERM on
      SIGTERM / Ctrl-C              stop accepting; open requests and WebSockets get
                                    shutdown_timeout to finish; then WebSockets are closed with
                                    1012 and the rest is cut; the lifespan closes the pools;
                                    exit status 0

uvicorn's own `Server` closes every WebSocket at once on shutdown (1012) and raises the signal
again once it is done (exit status 143 for SIGTERM); `GatewayServer` changes those two things.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import multiprocessing
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from ._config import GatewayConfig, load_config
from ._errors import ConfigError
from ._gateway import Gateway, build
from ._keys import Listen
from ._types import ASGIApp

__all__ = ["GatewayServer", "bind", "log_config", "serve", "uvicorn_config"]

logger = logging.getLogger("asgi_proxy_pass")

#: After the grace period: time for the 1012 close handshakes before what is left is cancelled.
CLOSE_TIMEOUT = 1


class GatewayServer(uvicorn.Server):
    """uvicorn's `Server`, stopping like nginx and exiting with status 0.

    On SIGTERM or SIGINT it stops accepting connections and closes idle ones; requests in
    flight finish (their connections close after the response) and WebSockets stay open, for up
    to `grace` seconds. Then what is left is closed as uvicorn does (1012 to WebSockets,
    cancellation after `CLOSE_TIMEOUT`) and the lifespan shutdown closes the upstream pools. A
    second Ctrl-C cuts everything at once.
    """

    def __init__(self, config: uvicorn.Config, *, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's, without raising the signal again afterwards: a requested stop is a success.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        state = self.server_state
        websocket = self.config.ws_protocol_class
        for connection in list(state.connections):
            if websocket is None or not isinstance(connection, websocket):
                connection.shutdown()  # closes it if idle, else once the response is sent
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        if state.connections:
            logger.info(
                "stopping: waiting up to %gs for %d open connection(s)",
                self.grace,
                len(state.connections),
            )
        while (state.connections or state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                logger.warning(
                    "stopping: shutdown_timeout (%gs) is over; closing %d connection(s)",
                    self.grace,
                    len(state.connections),
                )
                break
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


def bind(listen: Listen) -> socket.socket:
    """A socket bound to `listen`, not yet listening.

    TCP sockets are made with IPPROTO_TCP (asyncio sets TCP_NODELAY only on those) and
    SO_REUSEADDR, as uvicorn does. A unix socket file left by a process that is gone is removed.

    Raises:
        OSError: the address is in use, not available, or not allowed.
    """
    if listen.uds is not None:
        path = listen.uds
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(path)
                    except ConnectionRefusedError:
                        os.unlink(path)  # nobody listens: a leftover
                    else:
                        raise OSError(98, "address already in use")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            raise
        return sock
    family, _, _, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def log_config(server: Mapping[str, Any]) -> dict[str, Any]:
    """`logging.config.dictConfig` data: errors to standard error at `log_level`, access lines
    to standard output or the `access_log` file."""
    level = server["log_level"].upper()
    access = server["access_log"]
    handlers: dict[str, Any] = {
        "error": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "error",
        }
    }
    if access is True:
        handlers["access"] = {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "access",
        }
    elif access:
        handlers["access"] = {
            "class": "logging.FileHandler",
            "filename": access,
            "encoding": "utf-8",
            "formatter": "access",
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "error": {"format": "%(asctime)s [%(levelname)s] %(message)s"},
            "access": {"format": "%(message)s"},
        },
        "handlers": handlers,
        "loggers": {
            "uvicorn": {"handlers": ["error"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "asgi_proxy_pass": {"handlers": ["error"], "level": level, "propagate": False},
            "asgi_proxy_pass.access": {
                "handlers": ["access"] if access else [],
                "level": "INFO",
                "propagate": False,
            },
        },
    }


def uvicorn_config(app: ASGIApp, server: Mapping[str, Any]) -> uvicorn.Config:
    """uvicorn's settings for the gateway: the upstream's `Server` and `Date` pass through,
    forwarding headers are `trusted_proxies`' business, the access log is ours."""
    return uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        ssl_certfile=server["tls_certificate"],
        ssl_keyfile=server["tls_certificate_key"],
        timeout_keep_alive=cast(int, server["keepalive_timeout"]),  # a float works too
        timeout_graceful_shutdown=CLOSE_TIMEOUT,
    )


def serve(built: Gateway) -> int:
    """Run a built gateway until SIGTERM or Ctrl-C: 0 after a clean stop, 1 if it cannot start.

    Raises:
        ConfigError: the address cannot be listened on (in use, not local, not allowed).
    """
    config = built.config
    server = config.server
    listen: Listen = server["listen"]
    try:
        logging.config.dictConfig(log_config(server))
    except ValueError as exc:  # the access log file cannot be opened
        detail = f"cannot open {server['access_log']}: {exc.__cause__ or exc}"
        raise config.where("[server]").error("access_log", detail) from None
    try:
        sock = bind(listen)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        detail = f"cannot listen on {listen}: {reason}"
        raise config.where("[server]").error("listen", detail) from None
    scheme = "https" if server["tls_certificate"] else "http"
    workers = server["workers"]
    logger.info(
        "listening on %s, %d worker%s",
        listen if listen.uds else f"{scheme}://{listen}",
        workers,
        "s" if workers > 1 else "",
    )
    try:
        if workers == 1:
            return run(built.app, server, sock)
        return supervise(config, sock)
    finally:
        sock.close()
        if listen.uds is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.uds)


def run(app: ASGIApp, server: Mapping[str, Any], sock: socket.socket) -> int:
    """Serve `app` on `sock` in this process; 0 after a requested stop, 1 if it cannot start."""
    uv = GatewayServer(uvicorn_config(app, server), grace=server["shutdown_timeout"])
    try:
        uv.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's way of failing at startup
        logger.error("the gateway could not start (status %s)", exc.code)
        return 1
    return 0 if uv.started else 1


def supervise(config: GatewayConfig, sock: socket.socket) -> int:
    """Run `workers` processes on `sock` until SIGTERM or Ctrl-C, restarting any that dies."""
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    args = (config.data, config.source, config.base, sock)

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=worker, args=args, name="asgi-proxy-pass worker")
        process.start()
        return process

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    processes = [start() for _ in range(config.server["workers"])]
    failed = False
    try:
        while not stop.wait(0.2):
            for i, process in enumerate(processes):
                if process.exitcode is None:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    logger.error("worker %s could not start; stopping", process.pid)
                    failed = True
                    stop.set()
                    break
                logger.error(
                    "worker %s exited with status %s; starting another",
                    process.pid,
                    process.exitcode,
                )
                processes[i] = start()
    finally:
        for process in processes:
            if process.exitcode is None:
                process.terminate()  # SIGTERM: each worker stops gracefully
        for process in processes:
            process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0


def worker(data: Mapping[str, Any], source: str, base: str, sock: socket.socket) -> None:
    """A worker process: rebuild the app from the configuration's data and serve it."""
    try:
        config = load_config(data, source=source, base=base)
        logging.config.dictConfig(log_config(config.server))
        built = build(config)
    except ConfigError as exc:
        print(f"asgi-proxy-pass: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    if run(built.app, config.server, sock) != 0:
        sys.exit(STARTUP_FAILURE)
