"""Response caching, nginx's `proxy_cache`: the configuration, the cache key, and the `Cache`
that owns the storage, the request coalescing and purging.

hishel (2.x) does the RFC 9111 rules it is good at and the storage; what a reverse proxy needs
on top is ours (see docs/caching.md for the full split):

    hishel                                   ours
    what may be stored (no-store, private,   the cache key ($scheme, $host, $request_uri)
      Authorization, status codes)           freshness and age, on an injectable clock
    Cache-Control parsing, Vary matching     X-Cache-Status
    conditional requests, 304 freshening     stale on error (use_stale, stale-if-error)
    SQLite and Redis storage that streams    coalescing of concurrent misses (proxy_cache_lock)
      while it stores, with a size cap       HEAD from a stored GET, Set-Cookie not stored
                                             purge of a key or a prefix
                                             small responses kept in memory (_cache_memory.py)

hishel is imported only when a cache is used, so that it stays an optional dependency.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import httpx2

from ._errors import ConfigError
from ._failover import FAILURE_CONDITIONS

if TYPE_CHECKING:
    from hishel import AsyncBaseStorage
    from redis.asyncio import Redis

    from ._cache_memory import MemoryTier
    from ._cache_transport import CacheTransport
    from ._upstream import Server, Upstream

__all__ = ["STALE_CONDITIONS", "Cache", "CacheConfig", "KeyTemplate"]

#: nginx `proxy_cache_use_stale` conditions (without `updating`).
STALE_CONDITIONS = FAILURE_CONDITIONS
#: The file name of the SQLite database inside `CacheConfig.path`.
SQLITE_FILE = "cache.db"
#: Transport wrappers kept (`Cache.transport`) before starting again.
MAX_TRANSPORTS = 256


@dataclass(frozen=True)
class CacheConfig:
    """How `ProxyPass(cache=...)` caches responses; `cache=True` means `CacheConfig()`.

    Every field has a plain value, so a config file can give the same keys
    (`CacheConfig.from_mapping`).

    Args:
        path: Directory of the SQLite database (nginx `proxy_cache_path`), created if missing.
            Default `.cache/asgi-proxy-pass`, relative to the working directory.
        redis_url: Store in Redis instead (`"redis://host:6379/0"`), so that several workers
            and hosts share one cache. Needs Redis 7. Default None: SQLite.
        redis_prefix: Prefix of every Redis key, to share one Redis database with other data.
        key: The cache key, nginx `proxy_cache_key` variables: `$scheme`, `$host` (the Host
            sent upstream; a pool member's own address stands for the whole pool), `$request_uri`
            (the raw target sent upstream, query included), `$uri`, `$args`, `$http_<name>`.
            Default `"$scheme://$host$request_uri"`.
        max_size: Bytes the SQLite database may use; the least recently used entries are evicted
            beyond (nginx `max_size`). Redis: use the server's `maxmemory`. Default 1 GiB.
        max_entry_size: Larger responses stream through and are not stored. Default 10 MiB.
        inactive: Seconds after which an entry nobody asked for is removed, fresh or not (nginx
            `inactive`, 10 min). Stale entries are kept that long for revalidation and
            `use_stale`. None: kept until `max_ttl` or eviction.
        max_ttl: Seconds after which an entry is removed whatever its headers say. Default None.
        use_stale: When the upstream fails, answer with a stale entry instead (nginx
            `proxy_cache_use_stale`): any of `"error"`, `"timeout"`, `"invalid_header"`,
            `"http_500"`, `"http_502"`, `"http_503"`, `"http_504"`, `"http_403"`,
            `"http_404"`, `"http_429"`. Default none; a response's own `stale-if-error=N`
            (RFC 5861) is honoured either way.
        lock: Concurrent misses for one key wait for the first one's response instead of
            each going upstream (nginx `proxy_cache_lock`, which is off by default there).
            Default True.
        lock_timeout: Seconds a request waits for that response before going upstream itself
            (nginx `proxy_cache_lock_timeout`). Default 5.
        store_set_cookie: Store responses that carry `Set-Cookie`, cookie included. Default
            False, like nginx: such a response is someone's session.
        status_header: The response header telling what the cache did (nginx
            `$upstream_cache_status`): `HIT`, `MISS`, `EXPIRED`, `REVALIDATED`, `STALE` or
            `BYPASS`. None to send none. Default `"X-Cache-Status"`.
        memory_size: Bytes of small responses this process keeps whole in memory, in front
            of the storage, so that a hit on them does no storage I/O (the least recently used
            are dropped beyond). 0 for none. Default 4 MiB.
        memory_entry_size: Responses with a larger body are read from the storage on every
            hit. Default 64 KiB.
        memory_ttl: Seconds a copy in memory answers before the storage confirms it again:
            about how long another process sharing the storage (workers on one SQLite file,
            Redis) can purge or replace an entry before this one sees it. None: until this
            process drops it. Default 1.
    """

    path: str = ".cache/asgi-proxy-pass"
    redis_url: str | None = None
    redis_prefix: str = "asgi-proxy-pass"
    key: str = "$scheme://$host$request_uri"
    max_size: int | None = 1024**3
    max_entry_size: int | None = 10 * 1024 * 1024
    inactive: float | None = 600.0
    max_ttl: float | None = None
    use_stale: Iterable[str] = ()
    lock: bool = True
    lock_timeout: float = 5.0
    store_set_cookie: bool = False
    status_header: str | None = "X-Cache-Status"
    memory_size: int = 4 * 1024 * 1024
    memory_entry_size: int = 64 * 1024
    memory_ttl: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("path", "redis_prefix", "key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"cache.{name}: expected a non-empty string")
        if self.redis_url is not None and not (
            isinstance(self.redis_url, str)
            and self.redis_url.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ConfigError(
                f"cache.redis_url: expected a redis://, rediss:// or unix:// URL, "
                f"got {self.redis_url!r}"
            )
        KeyTemplate(self.key)  # raises for unknown variables
        for name in ("max_size", "max_entry_size"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ConfigError(f"cache.{name}: expected bytes (>= 0) or None, got {value!r}")
        for name in ("memory_size", "memory_entry_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"cache.{name}: expected bytes (>= 0), got {value!r}")
        for name in ("inactive", "max_ttl", "lock_timeout", "memory_ttl"):
            value = getattr(self, name)
            if value is None and name != "lock_timeout":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < math.inf
            ):
                raise ConfigError(f"cache.{name}: expected positive seconds, got {value!r}")
        if isinstance(self.use_stale, str) or not isinstance(self.use_stale, Iterable):
            raise ConfigError(
                f"cache.use_stale: expected a list of conditions, got {self.use_stale!r}"
            )
        conditions = frozenset(self.use_stale)
        unknown = sorted(c for c in conditions if c not in STALE_CONDITIONS)
        if unknown:
            raise ConfigError(
                f"cache.use_stale: unknown condition {unknown[0]!r}; "
                f"expected some of {', '.join(sorted(STALE_CONDITIONS))}"
            )
        object.__setattr__(self, "use_stale", conditions)
        for name in ("lock", "store_set_cookie"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"cache.{name}: expected a bool, got {getattr(self, name)!r}")
        header = self.status_header
        if header is not None and not (
            isinstance(header, str) and re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", header)
        ):
            raise ConfigError(f"cache.status_header: {header!r} is not a valid header name")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> CacheConfig:
        """A config from a mapping with these field names (a config file's `[cache]` table)."""
        names = [field.name for field in fields(cls)]
        for name in data:
            if name not in names:
                raise ConfigError(
                    f"cache: unknown key {name!r}; expected some of {', '.join(names)}"
                )
        return cls(**data)


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_SIMPLE = frozenset({"scheme", "host", "request_uri", "uri", "args"})


class KeyTemplate:
    """A compiled `CacheConfig.key`: literal text and nginx-style variables."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.parts: list[tuple[bool, str]] = []  # (is_variable, text)
        position = 0
        for match in _VARIABLE.finditer(template):
            if match.start() > position:
                self.parts.append((False, template[position : match.start()]))
            name = match.group(1) or match.group(2)
            if name not in _SIMPLE and not (name.startswith("http_") and len(name) > 5):
                raise ConfigError(
                    f"cache.key: unknown variable ${name}; expected $scheme, $host, "
                    "$request_uri, $uri, $args or $http_<name>"
                )
            self.parts.append((True, name))
            position = match.end()
        if position < len(template):
            self.parts.append((False, template[position:]))

    def render(self, scheme: str, host: str, target: str, headers: httpx2.Headers) -> str:
        """The key of one upstream request; `target` is the raw request-target."""
        out = []
        for variable, text in self.parts:
            if not variable:
                out.append(text)
            elif text == "scheme":
                out.append(scheme)
            elif text == "host":
                out.append(host)
            elif text == "request_uri":
                out.append(target)
            elif text == "uri":
                out.append(target.partition("?")[0])
            elif text == "args":
                out.append(target.partition("?")[2])
            else:
                name = text[5:].replace("_", "-")
                out.append(",".join(headers.get_list(name)))
        return "".join(out)


class Cache:
    """The response cache of one `ProxyPass` (`proxy.cache`): its storage, the copies of small
    responses in memory (`memory`, None when `memory_size` is 0), the misses being filled now,
    and purging.

    Requests reach it through `transport()`, which wraps the transport of each attempt.
    `clock` gives wall-clock seconds for freshness and `Date` (default `time.time`; tests set
    a fake one).
    """

    def __init__(self, config: CacheConfig, pool: Upstream) -> None:
        try:
            import hishel  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "cache: response caching needs hishel; pip install 'asgi-proxy-pass[cache]'"
            ) from exc
        if config.redis_url is not None:
            try:
                import redis  # noqa: F401
            except ImportError as exc:  # pragma: no cover
                raise ImportError(
                    "cache.redis_url: Redis storage needs redis; "
                    "pip install 'asgi-proxy-pass[cache-redis]'"
                ) from exc
        from ._cache_memory import MemoryTier

        self.config = config
        self.key = KeyTemplate(config.key)
        self.clock: Callable[[], float] = time.time
        # Every member of a pool stands for the same resources: one name for all of them,
        # like nginx's $proxy_host, which is the upstream group's name.
        addresses = sorted({server.url.host_header for server in pool.servers})
        self.pool_host = ",".join(addresses) if len(addresses) > 1 else None
        self.fills: dict[str, anyio.Event] = {}
        self.waiting = 0
        limit = config.memory_entry_size
        if config.max_entry_size is not None:
            limit = min(limit, config.max_entry_size)
        self.memory: MemoryTier | None = (
            MemoryTier(config.memory_size, limit, config.memory_ttl)
            if config.memory_size > 0
            else None
        )
        self._storage: AsyncBaseStorage | None = None
        self._redis: Redis | None = None
        self._transports: dict[tuple[int, int], CacheTransport] = {}

    def __repr__(self) -> str:
        where = self.config.redis_url or str(Path(self.config.path) / SQLITE_FILE)
        return f"Cache({where!r})"

    @property
    def storage(self) -> AsyncBaseStorage:
        """hishel's storage, created on first use (and again after `aclose()`)."""
        if self._storage is None:
            self._storage = self._open()
        return self._storage

    def _open(self) -> AsyncBaseStorage:
        config = self.config
        if config.redis_url is not None:
            from hishel import AsyncRedisStorage
            from redis.asyncio import Redis

            self._redis = Redis.from_url(config.redis_url)
            return AsyncRedisStorage(
                self._redis,
                default_ttl=config.max_ttl,
                default_tti=config.inactive,
                max_stream_size=config.max_entry_size,
                key_prefix=config.redis_prefix,
            )
        from hishel import AsyncSqliteStorage

        return AsyncSqliteStorage(
            database_path=Path(config.path) / SQLITE_FILE,
            default_ttl=config.max_ttl,
            default_tti=config.inactive,
            max_stream_size=config.max_entry_size,
            max_size=config.max_size,
        )

    def transport(
        self,
        inner: httpx2.AsyncBaseTransport,
        server: Server,
        pool: Upstream,
        next_upstream: frozenset[str],
    ) -> httpx2.AsyncBaseTransport:
        """`inner` with this cache in front of it, for one attempt on `server`."""
        # One per transport and server, made once: this is asked for on every request. The
        # wrapper holds both, so their ids stay theirs while it is kept.
        key = (id(inner), id(server))
        wrapper = self._transports.get(key)
        if wrapper is None or wrapper.pool is not pool or wrapper.next_upstream != next_upstream:
            from ._cache_transport import CacheTransport

            if len(self._transports) >= MAX_TRANSPORTS:  # servers come and go
                self._transports.clear()
            wrapper = self._transports[key] = CacheTransport(
                self, inner, server, pool, next_upstream
            )
        return wrapper

    async def purge(self, key: str, *, prefix: bool = False) -> int:
        """Remove the entries of a key (every variant of it), or of every key starting with
        `key` when `prefix` is true; returns how many were removed.

        Keys are what `CacheConfig.key` makes, by default the upstream URL as sent:
        `await proxy.cache.purge("http://10.0.0.1:8000/users/", prefix=True)`.
        """
        self.forget(key, prefix=prefix)
        keys = await self._keys_with_prefix(key) if prefix else [key]
        removed = 0
        for each in keys:
            for entry in await self.storage.get_entries(each):
                await self.storage.remove_entry(entry.id)
                removed += 1
        return removed

    def forget(self, key: str, *, prefix: bool = False) -> None:
        """Drop this process's copies in memory of a key (or prefix): its entries are about to
        be removed or changed in the storage."""
        if self.memory is not None:
            self.memory.discard(key, prefix=prefix)

    async def _keys_with_prefix(self, prefix: str) -> list[str]:
        # hishel has no listing API: read its key index directly (the Redis key layout and the
        # SQLite table are hishel 2.x's, hence the <3 pin).
        _ = self.storage  # opens the Redis client, if that is the storage
        redis = self._redis
        if redis is not None:
            index = f"{self.config.redis_prefix}:idx:"
            pattern = index + _glob_escape(prefix) + "*"
            return [
                name.decode("utf-8")[len(index) :]
                async for name in redis.scan_iter(match=pattern, count=1000)
            ]
        database = Path(self.config.path) / SQLITE_FILE
        return await anyio.to_thread.run_sync(_sqlite_keys, database, prefix.encode("utf-8"))

    async def aclose(self) -> None:
        """Close the storage (its database connection or Redis client), and empty the memory."""
        if self.memory is not None:
            self.memory.clear()
        self._transports.clear()
        storage, self._storage, self._redis = self._storage, None, None
        if storage is not None:
            await storage.close()


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _sqlite_keys(database: Path, prefix: bytes) -> list[str]:
    if not database.exists():
        return []
    connection = sqlite3.connect(database)
    try:
        rows = connection.execute(
            "SELECT DISTINCT cache_key FROM entries WHERE substr(cache_key, 1, ?) = ?",
            (len(prefix), prefix),
        ).fetchall()
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        connection.close()
    return [bytes(row[0]).decode("utf-8") for row in rows]
