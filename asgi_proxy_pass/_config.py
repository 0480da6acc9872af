"""Reading a gateway configuration: `load_config()`, a file or a dict, into checked tables.

```toml
[server]
listen = "127.0.0.1:8080"

[upstreams.api]
servers = ["http://127.0.0.1:9000/", { url = "http://127.0.0.1:9001/", backup = true }]

[locations."/api/"]
proxy_pass = "api"
```

`load_config()` checks each table against its keys (`_keys.py`): types, unknown and missing
keys, location syntax, pool names, duplicates; and resolves relative file paths against the
file's directory. Whether the values make sense together (the URLs of a pool share a path,
header names are valid) is decided when `_gateway.build()` makes the objects, with errors placed
in the same table. Nothing is listened on here.
"""

from __future__ import annotations

import importlib
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError
from ._headers import TrustedProxies
from ._keys import (
    CACHE,
    HEALTH_CHECK,
    LOCATION,
    SERVER,
    SERVER_ENTRY,
    UPSTREAM,
    Listen,
    parse_location,
)
from ._proxy import NEXT_UPSTREAM
from ._schema import Invalid, Where, check_table, toml_key, toml_repr
from ._urls import parse_upstream

__all__ = ["ENV_VAR", "GatewayConfig", "Listen", "Location", "Pool", "load_config"]

ENV_VAR = "ASGI_PROXY_PASS_CONFIG"


_POOL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_TOP_LEVEL = ("server", "upstreams", "locations")


@dataclass(frozen=True)
class Pool:
    """An `[upstreams.NAME]` table, checked: its options, its servers and its health check."""

    name: str
    where: Where
    options: dict[str, Any]
    servers: list[dict[str, Any]]
    health_check: dict[str, Any] | None


@dataclass(frozen=True)
class Location:
    """A `[locations."PATH"]` table, checked. `pattern` is the table name as written."""

    pattern: str
    path: str
    exact: bool
    where: Where
    options: dict[str, Any]


@dataclass(frozen=True)
class GatewayConfig:
    """A checked configuration. `data`, `source` and `base` rebuild it in a worker process."""

    source: str
    base: str
    data: Mapping[str, Any]
    server: dict[str, Any]
    upstreams: dict[str, Pool]
    locations: list[Location]

    def where(self, table: str) -> Where:
        return Where(self.source, table)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; errors name it."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read it: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {exc}") from None


def load_config(
    config: Mapping[str, Any] | str | os.PathLike[str],
    *,
    source: str = "config",
    base: str | None = None,
) -> GatewayConfig:
    """Check a configuration, a path to a TOML file or the same data as a dict.

    Args:
        config: The file, or its data.
        source: What errors call a dict (a file is called by its path).
        base: The directory relative paths start from: the file's, or the current one.

    Raises:
        ConfigError: `gateway.toml: [locations."/api"] strip_prefix: expected a boolean, ...`.
    """
    if isinstance(config, (str, os.PathLike)):
        data: Mapping[str, Any] = read_toml(config)
        source = os.fspath(config)
        base = os.path.dirname(os.path.abspath(config))
    elif isinstance(config, Mapping):
        data = config
    else:
        raise ConfigError(f"config: expected a mapping or a path to a TOML file, got {config!r}")
    base = base or os.getcwd()
    for name in data:
        if name not in _TOP_LEVEL:
            raise ConfigError(
                f"{source}: [{toml_key(name)}]: unknown table; expected [server], "
                '[upstreams.NAME] or [locations."PATH"]'
            )
    server = _load_server(data.get("server", {}), Where(source, "[server]"), base)
    upstreams = _tables(data, "upstreams", source)
    pools = {}
    for name, table in upstreams.items():
        where = Where(source, f"[upstreams.{toml_key(name)}]")
        if not _POOL_NAME.fullmatch(name):
            raise where.error(None, 'a pool name is letters, digits, "_", "-" and "."')
        pools[name] = _load_pool(name, table, where, base)
    locations = _load_locations(_tables(data, "locations", source), pools, source, base)
    return GatewayConfig(source, base, data, server, pools, locations)


def _tables(data: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    tables = data.get(name, {})
    if not isinstance(tables, Mapping):
        raise ConfigError(
            f"{source}: {name}: expected tables [{name}.NAME], got {toml_repr(tables)}"
        )
    return tables


def _path(value: str, base: str) -> str:
    return os.path.join(base, os.path.expanduser(value))


def _load_server(table: Any, where: Where, base: str) -> dict[str, Any]:
    server = check_table(table, SERVER, where)
    try:
        TrustedProxies(server["trusted_proxies"])
    except ConfigError as exc:
        raise where.relabel(exc) from None
    for key in ("tls_certificate", "tls_certificate_key"):
        if server[key] is not None:
            server[key] = _path(server[key], base)
    if server["tls_certificate_key"] and not server["tls_certificate"]:
        raise where.error("tls_certificate_key", "set tls_certificate too")
    if server["tls_certificate"]:
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(server["tls_certificate"], server["tls_certificate_key"])
        except (OSError, ssl.SSLError) as exc:
            detail = f"cannot load the certificate and key: {exc}"
            raise where.error("tls_certificate", detail) from None
    if isinstance(server["access_log"], str):
        server["access_log"] = _path(server["access_log"], base)
        if not os.path.isdir(os.path.dirname(server["access_log"])):
            directory = os.path.dirname(server["access_log"])
            raise where.error("access_log", f"the directory {directory} does not exist")
    return server


def _load_pool(name: str, table: Any, where: Where, base: str) -> Pool:
    options = check_table(table, UPSTREAM, where)
    servers = []
    for i, entry in enumerate(options["servers"]):
        item = f"servers[{i}]"
        if isinstance(entry, str):
            entry = {"url": entry}
        elif not isinstance(entry, Mapping):
            raise where.error(item, f"expected a URL or a table, got {toml_repr(entry)}")
        server = check_table(entry, SERVER_ENTRY, Where(where.source, where.table, f"{item}."))
        try:
            parse_upstream(server["url"], argument=f"{item}")
        except ConfigError as exc:
            raise where.relabel(exc) from None
        servers.append(server)
    if isinstance(options["verify"], str):
        options["verify"] = _path(options["verify"], base)
    if options["queue"] and not any(server["max_conns"] for server in servers):
        raise where.error("queue", "no server has max_conns; a queue waits for one below it")
    health = None
    if options["health_check"] is not None:
        health_where = Where(where.source, f"[upstreams.{toml_key(name)}.health_check]")
        health = check_table(options["health_check"], HEALTH_CHECK, health_where)
    return Pool(name, where, options, servers, health)


def _load_locations(
    tables: Mapping[str, Any], pools: Mapping[str, Pool], source: str, base: str
) -> list[Location]:
    if not tables:
        raise ConfigError(
            f'{source}: [locations]: no location; add one, e.g. [locations."/"] with '
            'proxy_pass = "http://127.0.0.1:9000"'
        )
    seen: dict[tuple[bool, str], str] = {}
    locations = []
    for pattern, table in tables.items():
        where = Where(source, f"[locations.{toml_key(pattern)}]")
        try:
            exact, path = parse_location(pattern)
        except Invalid as exc:
            raise where.error(None, str(exc)) from None
        if (exact, path) in seen:
            raise where.error(None, f"the same location as [locations.{seen[exact, path]}]")
        seen[exact, path] = toml_key(pattern)
        options = check_table(table, LOCATION, where)
        target = options["proxy_pass"]
        if "://" in target:
            try:
                parse_upstream(target, argument="proxy_pass")
            except ConfigError as exc:
                raise where.relabel(exc) from None
        elif target not in pools:
            known = ", ".join(pools) or "none defined"
            raise where.error(
                "proxy_pass",
                f"no upstream named {toml_repr(target)}; expected a URL (http://...) or the "
                f"name of an [upstreams.NAME] table ({known})",
            )
        else:
            for key, default in (("verify", True), ("engine", None)):
                if options[key] is not default:
                    raise where.error(key, f"set {key} in [upstreams.{toml_key(target)}]")
        if isinstance(options["verify"], str):
            options["verify"] = _path(options["verify"], base)
        bad = sorted(set(options["next_upstream"]) - NEXT_UPSTREAM)
        if bad:
            raise where.error(
                "next_upstream",
                f"unknown condition {toml_repr(bad[0])}; expected some of "
                + ", ".join(sorted(NEXT_UPSTREAM)),
            )
        options["cache"] = _load_cache(options["cache"], where, base)
        locations.append(Location(pattern, path, exact, where, options))
    return locations


def _load_cache(value: bool | Mapping[str, Any], where: Where, base: str) -> dict[str, Any] | None:
    """A location's `cache`: None when off, else `CacheConfig`'s arguments (`true`: defaults)."""
    if value is False:
        return None
    table = {} if value is True else value
    cache = check_table(table, CACHE, Where(where.source, where.table, "cache."))
    cache["path"] = _path(cache["path"], base)
    # hishel (and redis) are optional: a cache that cannot work is a mistake found now, not
    # at the first request.
    needs = [("hishel", "cache", "caching needs hishel", "cache")]
    if cache["redis_url"] is not None:
        needs.append(("redis", "cache.redis_url", "Redis storage needs redis", "cache-redis"))
    for module, key, reason, extra in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            detail = f'{reason}; pip install "asgi-proxy-pass[{extra}]"'
            raise where.error(key, detail) from None
    return cache
