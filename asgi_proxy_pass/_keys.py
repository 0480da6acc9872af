"""The configuration file's tables, key by key: one source for validation, `--check` and docs.

Each section is a literal tuple of `Key(name, kind, default, doc)`: `load_config()` checks a
table against it, `docs/config-reference.md` is generated from it (a test keeps the two equal),
and the defaults are written as in TOML. The kinds that only this file needs (an address to
listen on, a location's path, statuses) are here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ._accesslog import DEFAULT_FORMAT, compile_format
from ._balancing import STRATEGIES
from ._cache import STALE_CONDITIONS
from ._engine import ENGINES
from ._errors import ConfigError
from ._schema import (
    REQUIRED,
    Invalid,
    Key,
    Kind,
    Section,
    boolean,
    integer,
    one_of,
    seconds,
    size,
    string,
    string_table,
    strings,
    toml_repr,
)

__all__ = [
    "CACHE",
    "HEALTH_CHECK",
    "LOCATION",
    "SECTIONS",
    "SERVER",
    "SERVER_ENTRY",
    "UPSTREAM",
    "Listen",
    "parse_listen",
    "parse_location",
]


@dataclass(frozen=True)
class Listen:
    """Where the gateway listens: a host and port, or a unix socket path."""

    host: str = "127.0.0.1"
    port: int = 8080
    uds: str | None = None

    def __str__(self) -> str:
        if self.uds is not None:
            return f"unix:{self.uds}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LISTEN = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]*)):(?P<port>[0-9]{1,5})")


def parse_listen(value: Any) -> Listen:
    """`"127.0.0.1:8080"`, `"[::1]:8080"`, `":8080"` or `"unix:/run/gw.sock"` as a `Listen`."""
    expected = 'expected "HOST:PORT", "[IPv6]:PORT", ":PORT" or "unix:/PATH"'
    if not isinstance(value, str):
        raise Invalid(f"{expected}, got {toml_repr(value)}")
    if value.startswith("unix:"):
        if not value[len("unix:") :].startswith("/"):
            raise Invalid(f"a unix socket needs an absolute path, got {toml_repr(value)}")
        return Listen(uds=value[len("unix:") :])
    match = _LISTEN.fullmatch(value)
    if match is None or int(match["port"]) > 65535:
        raise Invalid(f"{expected}, got {toml_repr(value)}")
    host = match["v6"] or match["host"] or "0.0.0.0"
    return Listen(host=host, port=int(match["port"]))


def _bool_or_path(expected: str) -> Kind:
    def check(value: Any) -> bool | str:
        if isinstance(value, bool) or (isinstance(value, str) and value):
            return value
        raise Invalid(f"expected {expected}, got {toml_repr(value)}")

    return Kind(expected, check)


def _statuses(value: Any) -> range | tuple[int, ...]:
    expected = 'expected a status, an array of statuses or a range such as "200-399"'
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, list) and value and all(type(item) is int for item in value):
        return tuple(value)
    if isinstance(value, str):
        low, dash, high = value.partition("-")
        if dash and low.strip().isdigit() and high.strip().isdigit():
            return range(int(low), int(high) + 1)
    raise Invalid(f"{expected}, got {toml_repr(value)}")


def _format(value: Any) -> str:
    try:
        compile_format(value)
    except ConfigError as exc:
        raise Invalid(str(exc).partition(": ")[2]) from None
    return str(value)


def _table(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    raise Invalid(f"expected a table, got {toml_repr(value)}")


def _cache(value: Any) -> bool | Mapping[str, Any]:
    if isinstance(value, (bool, Mapping)):
        return value
    raise Invalid(f"expected true, false or a table, got {toml_repr(value)}")


def _or_false(kind: Kind) -> Kind:
    # TOML has no null: `false` turns off a limit that is on by default (None in CacheConfig).
    expected = f"{kind.expected.removesuffix(')')}, or false)"
    expected = expected if kind.expected.endswith(")") else f"{kind.expected} or false"

    def check(value: Any) -> Any:
        if value is False:
            return None
        try:
            return kind.check(value)
        except Invalid:
            raise Invalid(f"expected {expected}, got {toml_repr(value)}") from None

    return Kind(expected, check)


def _some_of(choices: Iterable[str]) -> Kind:
    allowed = sorted(choices)
    expected = "an array of " + ", ".join(json.dumps(choice) for choice in allowed)

    def check(value: Any) -> tuple[str, ...]:
        if isinstance(value, list) and all(item in allowed for item in value):
            return tuple(value)
        raise Invalid(f"expected {expected}, got {toml_repr(value)}")

    return Kind(expected, check)


def _servers(value: Any) -> list[Any]:
    if isinstance(value, list) and value:
        return value
    raise Invalid(f"expected a non-empty array of URLs or server tables, got {toml_repr(value)}")


SERVER = (
    Key("listen", Kind('"HOST:PORT" or "unix:/PATH"', parse_listen), "127.0.0.1:8080",
        'The address to listen on: `"0.0.0.0:8080"`, `"[::]:8080"`, `":8080"` (all IPv4 '
        'interfaces) or a unix socket, `"unix:/run/gateway.sock"` (nginx `listen`).'),
    Key("workers", integer(1), 1,
        "Worker processes; each has its own connections and pool health state "
        "(nginx `worker_processes`)."),
    Key("tls_certificate", string, None,
        "PEM certificate chain: the gateway speaks HTTPS (nginx `ssl_certificate`)."),
    Key("tls_certificate_key", string, None,
        "PEM private key, if not in `tls_certificate` (nginx `ssl_certificate_key`)."),
    Key("access_log", _bool_or_path("true, false or a file path"), True,
        "One line per request: `true` to standard output, a file path to append to, or "
        "`false` (nginx `access_log`)."),
    Key("access_log_format", Kind("a string of $variables", _format), DEFAULT_FORMAT,
        "The line, in nginx `log_format` syntax; see [the variables](#access-log-variables).",
        "nginx's `combined`, then the upstream's (below)"),
    Key("log_level", one_of(["debug", "info", "warning", "error", "critical"]), "info",
        "Least severe error-log message shown on standard error (nginx `error_log ... info`)."),
    Key("trusted_proxies", strings, [],
        'IPs and networks (and `"unix"`) whose `X-Forwarded-*` headers are kept and extended; '
        "everyone else's are dropped (nginx `set_real_ip_from`)."),
    Key("shutdown_timeout", seconds, 30,
        "On SIGTERM or Ctrl-C, seconds that open requests and WebSockets get to finish "
        "before they are cut (nginx `worker_shutdown_timeout`)."),
    Key("keepalive_timeout", seconds, 5,
        "Seconds an idle client connection stays open (nginx `keepalive_timeout`)."),
)  # fmt: skip

UPSTREAM = (
    Key("servers", Kind("an array of URLs or server tables", _servers), REQUIRED,
        'The servers: URLs (`"http://10.0.0.1:8000/"`) or tables with `url` and the options '
        "below. All share one scheme and path (nginx `server`)."),
    Key("strategy", one_of(s for s in STRATEGIES if s != "hash"), "round_robin",
        "How a server is chosen: nginx's smooth weighted round robin, `least_conn`, "
        "`random_two` (nginx `random two least_conn`) or `ip_hash`."),
    Key("verify", _bool_or_path("true, false or a CA bundle path"), True,
        "TLS verification of `https://` servers: the system's CAs, none, or this bundle "
        "(nginx `proxy_ssl_verify`, `proxy_ssl_trusted_certificate`)."),
    Key("health_check", Kind("a table", _table), None,
        "Active health checks, a table with the keys below. Unset: passive checks only."),
    Key("engine", one_of(ENGINES), None,
        'The HTTP client: `"httptools"` (HTTP/1.1 on uvicorn\'s C parser) or `"httpx"` '
        "(httpx2's own transport); see [Performance](performance.md).",
        '`"httptools"`'),
    Key("queue", integer(0), 0,
        "Requests that may wait when every server is at its `max_conns`; more get 503 at "
        "once (nginx Plus `queue`)."),
    Key("queue_timeout", seconds, 60,
        "Seconds a queued request waits for a server before it gets 503 (nginx Plus "
        "`queue ... timeout=`)."),
)  # fmt: skip

SERVER_ENTRY = (
    Key("url", string, REQUIRED, "The server's URL, as for `proxy_pass`."),
    Key("weight", integer(1), 1, "Its share of requests (nginx `weight=`)."),
    Key("max_fails", integer(0), 1,
        "Failures within `fail_timeout` that take it out for `fail_timeout`; 0 never does "
        "(nginx `max_fails=`)."),
    Key("fail_timeout", seconds, 10, "Seconds it stays out (nginx `fail_timeout=`)."),
    Key("backup", boolean, False, "Used only when no other server can be (nginx `backup`)."),
    Key("down", boolean, False, "Never used (nginx `down`)."),
    Key("max_conns", integer(0), 0,
        "Requests and WebSockets it serves at once; a busy server is skipped, and when all "
        "are busy a request waits in the pool's `queue`. 0: no limit (nginx `max_conns=`)."),
)  # fmt: skip

HEALTH_CHECK = (
    Key("path", string, "/", "The request-target to GET on each server."),
    Key("interval", seconds, 10, "Seconds between two checks of a server."),
    Key("timeout", seconds, 5, "Seconds a check may take, body included."),
    Key("expect_status", Kind('a status, an array, or "200-399"', _statuses), "200-399",
        "Statuses that pass."),
    Key("healthy_threshold", integer(1), 1,
        "Passes in a row that bring an unhealthy server back (nginx Plus `passes=`)."),
    Key("unhealthy_threshold", integer(1), 1,
        "Failures in a row that take a server out (nginx Plus `fails=`)."),
    Key("headers", string_table, {}, "Extra request headers; a `Host` replaces the server's."),
)  # fmt: skip

LOCATION = (
    Key("proxy_pass", string, REQUIRED,
        'Where requests go: a URL (`"http://127.0.0.1:9000/"`) or the name of an '
        "`[upstreams.NAME]` pool. With a path, the location's prefix is replaced by it "
        "(nginx `proxy_pass`)."),
    Key("strip_prefix", boolean, None,
        "`true` always removes the prefix, `false` never does. Unset: nginx's rule, removed "
        "when the URL has a path."),
    Key("preserve_host", boolean, False,
        "Send the client's `Host` (nginx `proxy_set_header Host $http_host`)."),
    Key("request_headers", string_table, {},
        'Headers set on the request to the upstream; `""` removes one '
        "(nginx `proxy_set_header`)."),
    Key("response_headers", string_table, {},
        'Headers set on the response; `""` removes one (nginx `add_header`, '
        "`proxy_hide_header`)."),
    Key("redirect", boolean, True,
        "Rewrite `Location` headers that point at the upstream (nginx `proxy_redirect "
        "default`)."),
    Key("connect_timeout", seconds, 10, "nginx `proxy_connect_timeout`."),
    Key("read_timeout", seconds, 60,
        "Seconds between two reads from the upstream (nginx `proxy_read_timeout`)."),
    Key("write_timeout", seconds, 60,
        "Seconds between two writes to the upstream (nginx `proxy_send_timeout`)."),
    Key("max_body_size", size, None,
        'Largest request body, `10485760` or `"10m"`; larger gets 413. Unset: no limit '
        "(nginx `client_max_body_size`)."),
    Key("websocket", boolean, True, "Relay WebSockets; `false` refuses them with 403."),
    Key("websocket_idle_timeout", seconds, None,
        "Close a WebSocket after this many seconds without a message. Unset: never."),
    Key("next_upstream", strings, ["error", "timeout"],
        "When a failed attempt moves on to the next server of a pool, as nginx "
        "`proxy_next_upstream`: `error`, `timeout`, `http_502` ... or `off`."),
    Key("next_upstream_tries", integer(0), 0,
        "Attempts at most, 0 for no limit (nginx `proxy_next_upstream_tries`)."),
    Key("next_upstream_timeout", seconds, None,
        "Seconds after which no other server is tried (nginx `proxy_next_upstream_timeout`)."),
    Key("verify", _bool_or_path("true, false or a CA bundle path"), True,
        "TLS verification of an `https://` URL; for a pool, set it in `[upstreams.NAME]`."),
    Key("engine", one_of(ENGINES), None,
        "The HTTP client of a URL, as in `[upstreams.NAME]`; for a pool, set it there.",
        '`"httptools"`'),
    Key("cache", Kind("true, false or a table", _cache), False,
        "Cache responses (nginx `proxy_cache`): `true` for the defaults, or a table with the "
        "keys below. Needs `pip install \"asgi-proxy-pass[cache]\"`; see "
        "[Caching](caching.md)."),
)  # fmt: skip

# One key per `CacheConfig` field (a test keeps them equal); the kinds are TOML's, where
# `false` stands for CacheConfig's None ("no limit").
CACHE = (
    Key("path", string, ".cache/asgi-proxy-pass",
        "Directory of the SQLite database, relative to this file; created if missing (nginx "
        "`proxy_cache_path`)."),
    Key("redis_url", string, None,
        'Store in Redis 7 instead, `"redis://host:6379/0"`, shared by workers and hosts. '
        'Needs `pip install "asgi-proxy-pass[cache-redis]"`.'),
    Key("redis_prefix", string, "asgi-proxy-pass", "Prefix of every Redis key."),
    Key("key", string, "$scheme://$host$request_uri",
        "The cache key, with `$scheme`, `$host`, `$request_uri`, `$uri`, `$args` and "
        "`$http_NAME` (nginx `proxy_cache_key`)."),
    Key("max_size", _or_false(size), 1024**3,
        "Bytes the SQLite database may use; least recently used entries are evicted beyond "
        "(nginx `max_size`). For Redis, use its `maxmemory`.", "`\"1g\"`"),
    Key("max_entry_size", _or_false(size), 10 * 1024**2,
        "Larger responses stream through and are not stored.", "`\"10m\"`"),
    Key("inactive", _or_false(seconds), 600,
        "Seconds after which an entry nobody asked for is removed, fresh or not (nginx "
        "`inactive`); `false`: kept until `max_ttl` or eviction."),
    Key("max_ttl", seconds, None,
        "Seconds after which an entry is removed whatever its headers say."),
    Key("use_stale", _some_of(STALE_CONDITIONS), [],
        "When the upstream fails, answer with a stale entry: `error`, `timeout`, "
        "`http_502` ... (nginx `proxy_cache_use_stale`). A response's own `stale-if-error` "
        "counts either way."),
    Key("lock", boolean, True,
        "Concurrent misses of one key wait for the first one's response (nginx "
        "`proxy_cache_lock`)."),
    Key("lock_timeout", seconds, 5,
        "Seconds a request waits for it before going upstream itself (nginx "
        "`proxy_cache_lock_timeout`)."),
    Key("store_set_cookie", boolean, False,
        "Store responses that carry `Set-Cookie`, cookie included (nginx never does)."),
    Key("status_header", _or_false(string), "X-Cache-Status",
        "Response header saying `HIT`, `MISS`, `EXPIRED`, `REVALIDATED`, `STALE` or `BYPASS` "
        "(nginx `$upstream_cache_status`); `false` sends none."),
    Key("memory_size", size, 4 * 1024**2,
        "Bytes of small responses each worker keeps whole in memory in front of the storage; "
        "0 for none.", "`\"4m\"`"),
    Key("memory_entry_size", size, 64 * 1024,
        "Responses with a larger body are read from the storage on every hit.", "`\"64k\"`"),
    Key("memory_ttl", _or_false(seconds), 1,
        "Seconds a copy in memory answers before the storage is read again (how soon a purge "
        "by another worker is seen); `false`: until dropped."),
)  # fmt: skip

SECTIONS = (
    Section("[server]", "How the gateway listens, logs and stops.", SERVER),
    Section(
        "[upstreams.NAME]", "A pool of servers, like nginx's `upstream NAME { ... }`.", UPSTREAM
    ),
    Section(
        "[upstreams.NAME] servers = [{ url = ..., ... }]",
        "A server of a pool, written as a table instead of a URL.",
        SERVER_ENTRY,
    ),
    Section(
        "[upstreams.NAME.health_check]",
        "Active health checks of a pool's servers, like Caddy's `health_uri`.",
        HEALTH_CHECK,
    ),
    Section(
        '[locations."PATH"]',
        'A route, like nginx\'s `location`: `"/api/"` is a prefix, `"= /health"` an exact path.',
        LOCATION,
    ),
    Section(
        '[locations."PATH".cache]',
        "A location's response cache, when `cache` is a table: the fields of `CacheConfig`.",
        CACHE,
    ),
)


_LOCATION_PATH = re.compile(r"/[^\s?#]*")


def parse_location(pattern: str) -> tuple[bool, str]:
    """`"= /health"` -> (True, "/health"); `"/api/"` -> (False, "/api/")."""
    exact = pattern.startswith("=")
    path = pattern[1:].strip() if exact else pattern
    if not _LOCATION_PATH.fullmatch(path):
        raise Invalid(
            'expected a path prefix ("/api/") or an exact path ("= /health"); regular '
            "expressions, spaces, ? and # are not allowed"
        )
    return exact, path
