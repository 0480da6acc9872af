"""The ASGI apps the benchmark runs under uvicorn, one process each.

`BENCH_STATIC` is nginx (the GETs), `BENCH_DYNAMIC` the upload sink and WebSocket echo server
(backend.py): `/upload` and WebSockets go to the second, everything else to the first, as
nginx's reference configuration routes them.

    ours       ProxyPass, engine from BENCH_ENGINE ("httptools", "httpx" or "aiohttp", the
               last being the prototype in aiohttp_engine.py)
    asgiproxy  asgiproxy's simple proxy app (aiohttp client)
"""

from __future__ import annotations

import os
from typing import Any

STATIC = os.environ.get("BENCH_STATIC", "http://127.0.0.1:8001")
DYNAMIC = os.environ.get("BENCH_DYNAMIC", "http://127.0.0.1:8002")


def _ours() -> Any:
    from asgi_proxy_pass import ProxyPass

    engine = os.environ.get("BENCH_ENGINE", "httptools")
    if engine == "aiohttp":
        from aiohttp_engine import AiohttpTransport

        options: dict[str, Any] = {"transport": AiohttpTransport()}
    else:
        options = {"engine": engine}
    # The defaults otherwise: 60 s timeouts, redirects rewritten, X-Forwarded-* added.
    static = ProxyPass(STATIC, **options)
    dynamic = ProxyPass(DYNAMIC, **options)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await static(scope, receive, send)
        elif scope["type"] == "websocket" or scope["path"] == "/upload":
            await dynamic(scope, receive, send)
        else:
            await static(scope, receive, send)

    return app


def _asgiproxy() -> Any:
    from asgiproxy.__main__ import make_app

    static, _ = make_app(STATIC + "/")
    dynamic, _ = make_app(DYNAMIC + "/")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] == "websocket" or scope["path"] == "/upload":
            await dynamic(scope, receive, send)
        else:
            await static(scope, receive, send)

    return app


def __getattr__(name: str) -> Any:
    # Build only the app that this process serves.
    if name == "ours":
        return _ours()
    if name == "asgiproxy":
        return _asgiproxy()
    raise AttributeError(name)
