"""`gateway(config)`: a configuration's pools, proxies and routes as one Starlette app.

    [upstreams.NAME]     ->  one Upstream, shared by every location that names it
    [locations."PATH"]   ->  one ProxyPass each, behind a Router (longest prefix wins)
    [server] access_log  ->  the AccessLog middleware
    lifespan             ->  starts the pools' health checks, closes every connection at shutdown

Building is where the values are checked together: the library's own errors (a header name, a
pool whose servers differ in path) are placed in the table they came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from . import _engine as _engines
from ._accesslog import AccessLog
from ._cache import CacheConfig
from ._config import ENV_VAR, GatewayConfig, Location, Pool, load_config
from ._errors import ConfigError
from ._health import HealthCheck
from ._proxy import ProxyPass, lifespan
from ._routing import Route, Router, Routes
from ._schema import Where, toml_key
from ._upstream import Server, Upstream

__all__ = ["Gateway", "build", "describe", "gateway"]


def gateway(config: Mapping[str, Any] | str | os.PathLike[str] | None = None) -> Starlette:
    """A Starlette app that routes and proxies as a configuration file says.

    ```python
    app = gateway("gateway.toml")
    app.add_middleware(MyAuthMiddleware)
    ```

    The file is the one `asgi-proxy-pass --config` runs; its `[upstreams]` and `[locations]`
    make the app, and `[server] access_log` adds the `AccessLog` middleware (lines go to the
    `asgi_proxy_pass.access` logger). How to listen (`listen`, `workers`, TLS) is the server's
    business and is ignored here. The app's lifespan starts the pools' health checks and closes
    their connections.

    Args:
        config: A path to a TOML file, or the same data as a dict. Default: the path in the
            `ASGI_PROXY_PASS_CONFIG` environment variable, so that
            `uvicorn --factory asgi_proxy_pass:gateway` works.

    Raises:
        ConfigError: naming the file, the table and the key.
    """
    if config is None:
        path = os.environ.get(ENV_VAR)
        if not path:
            raise ConfigError(f"config: not given, and {ENV_VAR} is not set")
        config = path
    return build(load_config(config)).app


@dataclass(frozen=True)
class Gateway:
    """A built gateway: the app, and what it is made of (for `--check` and tests)."""

    config: GatewayConfig
    pools: dict[str, Upstream]
    proxies: dict[str, ProxyPass]
    routes: Routes
    app: Starlette


def build(config: GatewayConfig) -> Gateway:
    """Make the pools, proxies, routes and app of a checked configuration. No I/O."""
    pools = {name: _pool(pool) for name, pool in config.upstreams.items()}
    proxies = {loc.pattern: _proxy(loc, pools, config.server) for loc in config.locations}
    routes = Routes(
        Route(loc.pattern, loc.path, loc.exact, proxies[loc.pattern], loc.options["websocket"])
        for loc in config.locations
    )
    middleware = []
    if config.server["access_log"] is not False:
        middleware.append(Middleware(AccessLog, format=config.server["access_log_format"]))
    used = [pool for pool in pools.values() if any(p.pool is pool for p in proxies.values())]
    app = Starlette(
        routes=[Mount("", app=Router(routes))],
        middleware=middleware,
        lifespan=lifespan(*proxies.values(), *used),
    )
    return Gateway(config, pools, proxies, routes, app)


def _pool(pool: Pool) -> Upstream:
    servers = []
    for i, entry in enumerate(pool.servers):
        try:
            servers.append(Server(**entry))
        except ConfigError as exc:
            where = Where(pool.where.source, pool.where.table, f"servers[{i}].")
            raise where.relabel(exc) from None
    health = None
    if pool.health_check is not None:
        try:
            health = HealthCheck(**pool.health_check)
        except ConfigError as exc:
            where = Where(pool.where.source, f"[upstreams.{toml_key(pool.name)}.health_check]")
            raise where.relabel(exc) from None
    options = pool.options
    try:
        return Upstream(
            servers,
            strategy=options["strategy"],
            health_check=health,
            verify=options["verify"],
            engine=options["engine"],
            queue=options["queue"],
            queue_timeout=options["queue_timeout"],
        )
    except ConfigError as exc:
        raise pool.where.relabel(exc) from None


def _proxy(
    location: Location, pools: Mapping[str, Upstream], server: Mapping[str, Any]
) -> ProxyPass:
    options = location.options
    connect = options["connect_timeout"]
    kwargs: dict[str, Any] = {
        "strip_prefix": options["strip_prefix"],
        "timeout": httpx2.Timeout(
            connect=connect,
            read=options["read_timeout"],
            write=options["write_timeout"],
            pool=connect,
        ),
        "preserve_host": options["preserve_host"],
        "trusted_proxies": server["trusted_proxies"],
        # nginx: a header set to "" is not sent.
        "request_headers": {k: v or None for k, v in options["request_headers"].items()},
        "response_headers": {k: v or None for k, v in options["response_headers"].items()},
        "redirect": options["redirect"],
        "max_body_size": options["max_body_size"],
        "next_upstream": options["next_upstream"],
        "next_upstream_tries": options["next_upstream_tries"],
        "next_upstream_timeout": options["next_upstream_timeout"],
        "websocket_idle_timeout": options["websocket_idle_timeout"],
    }
    if options["cache"] is not None:
        try:
            kwargs["cache"] = CacheConfig(**options["cache"])
        except ConfigError as exc:
            raise location.where.relabel(exc) from None
    target = options["proxy_pass"]
    try:
        if "://" in target:
            return ProxyPass(target, verify=options["verify"], engine=options["engine"], **kwargs)
        return ProxyPass(pools[target], **kwargs)
    except ConfigError as exc:
        raise location.where.relabel(exc) from None


def describe(built: Gateway) -> str:
    """The resolved configuration, as `--check` prints it: listener, pools and routes."""
    config, server = built.config, built.config.server
    listen = server["listen"]
    scheme = "https" if server["tls_certificate"] else "http"
    address = str(listen) if listen.uds else f"{scheme}://{listen}"
    workers = server["workers"]
    log = server["access_log"]
    lines = [
        f"{config.source}: the configuration is valid",
        "",
        f"listen      {address}, {workers} worker{'s' if workers > 1 else ''}",
        f"access log  {'off' if log is False else 'standard output' if log is True else log}",
    ]
    for name, pool in built.pools.items():
        check = pool.health_check
        health = f", health check GET {check.path} every {check.interval:g}s" if check else ""
        queue = f", queue {pool.queue} for {pool.queue_timeout:g}s" if pool.queue else ""
        lines += ["", f"upstream {name}: {pool.strategy}{_engine(pool)}{health}{queue}"]
        lines += [f"    {member!r}" for member in pool.servers]
    names = {id(pool): name for name, pool in built.pools.items()}
    rows = []
    for route in built.routes:
        proxy = built.proxies[route.pattern]
        pool_name = names.get(id(proxy.pool))
        target = proxy.upstream.url + _engine(proxy.pool)
        if pool_name is not None:
            target = f"upstream {pool_name}"
        rows.append((route.pattern, target, _example(built.routes, route, proxy)))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines += ["", "locations, in the order they are tried:"]
    for pattern, target, example in rows:
        lines.append(f"    {pattern:<{widths[0]}}  ->  {target:<{widths[1]}}  {example}".rstrip())
    return "\n".join(lines)


def _engine(pool: Upstream) -> str:
    # Shown only when it is not the one every pool uses unless told.
    return "" if pool.engine == _engines.DEFAULT_ENGINE else f", engine {pool.engine}"


def _example(routes: Routes, route: Route, proxy: ProxyPass) -> str:
    # What a sample request becomes upstream, computed by the proxy itself.
    path = route.path if route.exact else route.mount + "/x"
    target = proxy.target({"root_path": route.mount, "path": path, "raw_path": path.encode()})
    example = f"{path} -> {target.decode('latin-1')}"
    short = routes.match(route.mount)
    if not route.exact and short.redirect and short.route is route:
        example += f"; {route.mount} -> 301 {route.path}"
    if proxy.cache is not None:
        example += "; cached"
    if not route.websocket:
        example += "; no WebSockets"
    return example
