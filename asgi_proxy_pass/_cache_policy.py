"""Cache decisions that hishel leaves to us: pure functions of headers and a clock, no I/O.

hishel's own lookup (`IdleClient`) reads `time.time()` itself, ignores a stored `Age`, takes a
response without `Date` as forever 0 seconds old, and has no stale-if-error. A proxy needs all
four, so choosing among stored entries is done here, with hishel's `Cache-Control` parser and
its `Vary` matching:

    stored entry, for this request                     outcome
    other method (HEAD asks for GET entries too),      ignored
      or Vary does not match
    age < freshness lifetime, no `no-cache`            fresh: served (HIT)
    otherwise                                          stale: revalidated (If-None-Match /
                                                       If-Modified-Since), or served if the
                                                       upstream fails and `stale_usable()`

Age and freshness follow RFC 9111 section 4.2, with the `Date` of the response as its
`response_time` (a `Date` is added on receipt when the upstream sent none, RFC 9110 6.6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from email.utils import formatdate
from functools import lru_cache
from typing import TYPE_CHECKING

from hishel import Headers
from hishel._core._headers import parse_cache_control as _parse_cache_control
from hishel._core._spec import vary_headers_match
from hishel._utils import parse_date as _parse_date

if TYPE_CHECKING:
    from hishel import Entry, Request, Response
    from hishel._core._headers import CacheControl

__all__ = [
    "Lookup",
    "current_age",
    "freshness_lifetime",
    "http_date",
    "internal_headers",
    "lookup",
    "not_modified",
    "raw_headers",
    "stale_usable",
]

#: RFC 9111 4.2.2: heuristic freshness is a fraction of the time since Last-Modified; nginx
#: does none, browsers use 10%, capped here at a week like hishel.
HEURISTIC_FRACTION = 0.1
HEURISTIC_LIMIT = 7 * 24 * 3600
#: RFC 9110 15.1: statuses whose responses are heuristically cacheable.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
#: RFC 5861 section 4: an "error" is what would become 500, 502, 503 or 504.
STALE_IF_ERROR = frozenset(
    {"error", "timeout", "invalid_header", "http_500", "http_502", "http_503", "http_504"}
)


@lru_cache(maxsize=1024)
def parse_cache_control(value: str | None) -> CacheControl:
    """hishel's `Cache-Control` parser, memoised: every hit on an entry parses the same few
    values again. The result is shared, so never changed."""
    return _parse_cache_control(value)


@lru_cache(maxsize=1024)
def parse_date(value: str) -> int | None:
    """An HTTP date in epoch seconds (None if invalid), memoised like `parse_cache_control`."""
    return _parse_date(value)


def internal_headers(raw: list[tuple[bytes, bytes]]) -> Headers:
    """hishel's headers (names lowercased, values of one name grouped) from raw pairs.

    Latin-1 both ways, so any byte survives the round trip through the storage.
    """
    grouped: dict[str, list[str]] = {}
    for name, value in raw:
        grouped.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return Headers(grouped)


def raw_headers(
    headers: Headers, *, drop: frozenset[str] = frozenset()
) -> list[tuple[bytes, bytes]]:
    """Raw pairs from hishel's headers: several `Set-Cookie` stay several lines."""
    return [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name in headers
        if name not in drop
        for value in headers.get_list(name) or ()
    ]


def http_date(seconds: float) -> str:
    """An IMF-fixdate, for `Date`."""
    return formatdate(seconds, usegmt=True)


def freshness_lifetime(response: Response) -> float | None:
    """Seconds the response is fresh for a shared cache (RFC 9111 4.2.1), None if unknown."""
    headers = response.headers
    cc = parse_cache_control(_value(headers, "cache-control"))
    if cc.s_maxage is not None:
        return cc.s_maxage
    if cc.max_age is not None:
        return cc.max_age
    date = parse_date(_value(headers, "date") or "")
    expires_value = _value(headers, "expires")
    if expires_value is not None:
        expires = parse_date(expires_value)
        # An invalid Expires, "0" included, means already expired (RFC 9111 5.3).
        if expires is None or date is None:
            return 0
        return max(0, expires - date)
    last_modified = parse_date(_value(headers, "last-modified") or "")
    if (
        date is not None
        and last_modified is not None
        and (response.status_code in HEURISTIC_STATUSES or cc.public)
    ):
        return min(HEURISTIC_LIMIT, max(0, date - last_modified) * HEURISTIC_FRACTION)
    return None


def current_age(response: Response, now: float) -> float:
    """RFC 9111 4.2.3, with the response's `Date` as the time it was received."""
    headers = response.headers
    date = parse_date(_value(headers, "date") or "")
    resident = max(0.0, now - date) if date is not None else 0.0
    try:
        age_value = max(0, int((_value(headers, "age") or "0").split(",")[0]))
    except ValueError:
        age_value = 0
    return age_value + resident


@dataclass
class Lookup:
    """The stored entries of one key, sorted out for one request."""

    fresh: Entry | None = None
    age: float = 0.0
    stale: list[Entry] = field(default_factory=list)


def lookup(request: Request, entries: list[Entry], now: float) -> Lookup:
    """The freshest usable entry, else the stale candidates to revalidate, newest first.

    Vary-mismatched entries are not candidates: revalidating one cannot be answered from it,
    and serving it stale would give one client another's variant. A HEAD with no fresh HEAD
    entry takes a fresh GET one (RFC 9110 9.3.2), but does not revalidate it.
    """
    forced = parse_cache_control(_value(request.headers, "cache-control")).no_cache is True
    result = _lookup(request, request.method, entries, now, forced)
    if result.fresh is None and request.method == "HEAD":
        result = _lookup(request, "GET", entries, now, forced)
        result.stale = []
    return result


def _lookup(
    request: Request, method: str, entries: list[Entry], now: float, forced: bool
) -> Lookup:
    result = Lookup()
    best_age = 0.0
    matching: list[tuple[float, Entry]] = []
    for entry in entries:
        response = entry.response
        if entry.request.method != method or (
            _value(response.headers, "vary") and not vary_headers_match(request, entry)
        ):
            continue
        age = current_age(response, now)
        lifetime = freshness_lifetime(response)
        no_cache = parse_cache_control(_value(response.headers, "cache-control")).no_cache is True
        if not forced and not no_cache and lifetime is not None and age < lifetime:
            if result.fresh is None or age < best_age:
                result.fresh, best_age = entry, age
        else:
            matching.append((age, entry))
    result.age = best_age
    result.stale = [entry for _, entry in sorted(matching, key=lambda pair: pair[0])]
    return result


def stale_usable(response: Response, condition: str, now: float, use_stale: frozenset[str]) -> bool:
    """Whether a stale `response` may answer when the upstream failed with `condition`.

    `must-revalidate`, `proxy-revalidate` and `no-cache` forbid it (RFC 9111 5.2.2.2, 5.2.2.8);
    otherwise `use_stale` (nginx `proxy_cache_use_stale`) allows it, and so does the response's
    `stale-if-error=N` for errors within N seconds of staleness (RFC 5861 section 4).
    """
    cc = parse_cache_control(_value(response.headers, "cache-control"))
    if cc.must_revalidate or cc.proxy_revalidate or cc.no_cache is True:
        return False
    if condition in use_stale:
        return True
    if cc.stale_if_error is None or condition not in STALE_IF_ERROR:
        return False
    lifetime = freshness_lifetime(response) or 0
    return current_age(response, now) - lifetime <= cc.stale_if_error


def not_modified(request: Request, response: Response) -> bool:
    """Whether a client's conditional GET or HEAD is answered 304 by a stored 200
    (RFC 9110 13.1.2 and 13.1.3: If-None-Match wins over If-Modified-Since)."""
    if response.status_code != 200:
        return False
    headers = request.headers
    if_none_match = _value(headers, "if-none-match")
    if if_none_match is not None:
        etag = _value(response.headers, "etag")
        if etag is None:
            return False
        wanted = [tag.strip() for tag in if_none_match.split(",")]
        return "*" in wanted or _opaque(etag) in {_opaque(tag) for tag in wanted}
    since = parse_date(_value(headers, "if-modified-since") or "")
    modified = parse_date(_value(response.headers, "last-modified") or "")
    return since is not None and modified is not None and modified <= since


def _value(headers: Headers, name: str) -> str | None:
    # headers.get(name), without raising and catching a KeyError for every absent name.
    values = headers.get_list(name)
    return ", ".join(values) if values is not None else None


def _opaque(tag: str) -> str:
    # Weak comparison (RFC 9110 8.8.3.2), the one If-None-Match uses.
    tag = tag.strip()
    return tag[2:] if tag[:2] in ("W/", "w/") else tag
