"""The configuration file: every kind of mistake gets one message naming file, table and key.

`load_config()` and `build()` run in-process here (no listening); `--check` goes through
`main()`, as the command runs it. The reference in docs/config-reference.md is generated from
the same key tables: `python tests/test_config_file.py` rewrites it.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from asgi_proxy_pass._cache import CacheConfig
from asgi_proxy_pass._cli import main
from asgi_proxy_pass._config import load_config
from asgi_proxy_pass._errors import ConfigError
from asgi_proxy_pass._gateway import build
from asgi_proxy_pass._keys import CACHE, SECTIONS
from asgi_proxy_pass._schema import Where, check_table, reference

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "config-reference.md"
BEGIN, END = "<!-- BEGIN GENERATED: keys -->", "<!-- END GENERATED: keys -->"

GOOD = """\
[server]
listen = "127.0.0.1:8080"
trusted_proxies = ["10.0.0.0/8"]

[upstreams.api]
servers = [
    "http://127.0.0.1:9000/",
    { url = "http://127.0.0.1:9001/", weight = 2, max_conns = 8 },
]
strategy = "least_conn"
health_check = { path = "/healthz", interval = 5, expect_status = [200, 204] }
engine = "httpx"
queue = 20
queue_timeout = 2.5

[locations."/api/"]
proxy_pass = "api"
request_headers = { X-Source = "gateway", Cookie = "" }
max_body_size = "10m"

[locations."/api/".cache]
path = "cache"
max_size = "100m"
inactive = false
use_stale = ["error", "http_502"]
status_header = "X-Cached"
lock_timeout = 1

[locations."= /health"]
proxy_pass = "http://127.0.0.1:9100/status"
engine = "httpx"
cache = true

[locations."/"]
proxy_pass = "http://127.0.0.1:9100"
websocket = false
"""

LOCATION = '[locations."/"]\nproxy_pass = "http://127.0.0.1:9000"\n'
POOL = '[upstreams.api]\nservers = ["http://127.0.0.1:9000/"]\n'

# One case per kind of mistake: the file's text, and the message after "FILE: ".
MISTAKES = {
    "toml syntax": ("[server\n", "invalid TOML: Expected ']' at the end of a table declaration"),
    "duplicate table": (
        LOCATION + LOCATION,
        "invalid TOML: Cannot declare ('locations', '/') twice (at line 3, column 15)",
    ),
    "duplicate location": (
        '[locations."=/x"]\nproxy_pass = "http://a"\n[locations."= /x"]\nproxy_pass = "http://a"\n',
        '[locations."= /x"]: the same location as [locations."=/x"]',
    ),
    "unknown table": ("[sever]\n" + LOCATION, "[sever]: unknown table; expected [server]"),
    "unknown key": (
        LOCATION + "strip_prefx = true\n",
        '[locations."/"] strip_prefx: unknown key; did you mean strip_prefix? expected one of',
    ),
    "wrong type": (
        LOCATION + 'strip_prefix = "yes"\n',
        '[locations."/"] strip_prefix: expected a boolean, got "yes"',
    ),
    "wrong number": (
        "[server]\nworkers = 0\n" + LOCATION,
        "[server] workers: expected an integer >= 1, got 0",
    ),
    "missing key": (
        '[locations."/"]\nwebsocket = true\n',
        '[locations."/"] proxy_pass: missing; expected a string',
    ),
    "no location": (POOL, '[locations]: no location; add one, e.g. [locations."/"]'),
    "unknown pool": (
        POOL + '[locations."/"]\nproxy_pass = "apii"\n',
        '[locations."/"] proxy_pass: no upstream named "apii"; expected a URL (http://...) or '
        "the name of an [upstreams.NAME] table (api)",
    ),
    "bad url": (
        '[locations."/"]\nproxy_pass = "ftp://x"\n',
        "[locations.\"/\"] proxy_pass: expected an http://, https://, ws:// or wss:// URL, got 'ftp://x'",
    ),
    "bad location": (
        '[locations."~ \\\\.php$"]\nproxy_pass = "http://a"\n',
        '[locations."~ \\\\.php$"]: expected a path prefix ("/api/") or an exact path',
    ),
    "bad listen": (
        '[server]\nlisten = "8080"\n' + LOCATION,
        '[server] listen: expected "HOST:PORT", "[IPv6]:PORT", ":PORT" or "unix:/PATH", got "8080"',
    ),
    "bad size": (
        LOCATION + 'max_body_size = "ten megs"\n',
        '[locations."/"] max_body_size: expected bytes (an integer, or a string such as "10m")',
    ),
    "bad choice": (
        "[server]\nlog_level = 'loud'\n" + LOCATION,
        '[server] log_level: expected one of "debug", "info", "warning", "error", "critical", '
        'got "loud"',
    ),
    "bad server entry": (
        '[upstreams.api]\nservers = [{ url = "http://a:1/", weight = 0 }]\n' + LOCATION,
        "[upstreams.api] servers[0].weight: expected an integer >= 1, got 0",
    ),
    "empty pool": (
        "[upstreams.api]\nservers = []\n" + LOCATION,
        "[upstreams.api] servers: expected",
    ),
    "pool paths differ": (
        '[upstreams.api]\nservers = ["http://a:1/", "http://b:1/v2/"]\n' + LOCATION,
        "[upstreams.api] servers[1]: 'http://b:1/v2/' has path '/v2/' but the pool has '/'",
    ),
    "bad health check": (
        POOL + '[upstreams.api.health_check]\npath = "healthz"\n' + LOCATION,
        "[upstreams.api.health_check] path: expected a request-target starting with '/'",
    ),
    "bad header name": (
        LOCATION + 'request_headers = { "Bad Name" = "x" }\n',
        "[locations.\"/\"] request_headers: 'Bad Name' is not a valid header name",
    ),
    "bad next_upstream": (
        LOCATION + 'next_upstream = ["eror"]\n',
        '[locations."/"] next_upstream: unknown condition "eror"; expected some of error,',
    ),
    "engine on a pool location": (
        POOL + '[locations."/"]\nproxy_pass = "api"\nengine = "httpx"\n',
        '[locations."/"] engine: set engine in [upstreams.api]',
    ),
    "bad engine": (
        POOL + 'engine = "curl"\n' + LOCATION,
        '[upstreams.api] engine: expected one of "httptools", "httpx", got "curl"',
    ),
    "bad max_conns": (
        '[upstreams.api]\nservers = [{ url = "http://a:1/", max_conns = -1 }]\n' + LOCATION,
        "[upstreams.api] servers[0].max_conns: expected an integer >= 0, got -1",
    ),
    "bad queue": (
        POOL + "queue = 1.5\n" + LOCATION,
        "[upstreams.api] queue: expected an integer >= 0, got 1.5",
    ),
    "queue without max_conns": (
        POOL + "queue = 10\n" + LOCATION,
        "[upstreams.api] queue: no server has max_conns; a queue waits for one below it",
    ),
    "bad queue_timeout": (
        POOL + "queue_timeout = 0\n" + LOCATION,
        "[upstreams.api] queue_timeout: expected positive seconds (a number), got 0",
    ),
    "bad cache": (
        LOCATION + 'cache = "on"\n',
        '[locations."/"] cache: expected true, false or a table, got "on"',
    ),
    "unknown cache key": (
        LOCATION + "cache = { max_sise = 1 }\n",
        '[locations."/"] cache.max_sise: unknown key; did you mean max_size? expected one of',
    ),
    "bad cache value": (
        LOCATION + '[locations."/".cache]\ninactive = "10m"\n',
        '[locations."/"] cache.inactive: expected positive seconds (a number, or false), got "10m"',
    ),
    "bad cache condition": (
        LOCATION + 'cache = { use_stale = ["eror"] }\n',
        '[locations."/"] cache.use_stale: expected an array of "error", "http_403",',
    ),
    "bad cache key variable": (
        LOCATION + 'cache = { key = "$host$path" }\n',
        '[locations."/"] cache.key: unknown variable $path; expected $scheme, $host,',
    ),
    "bad cache redis_url": (
        LOCATION + 'cache = { redis_url = "http://r:6379" }\n',
        '[locations."/"] cache.redis_url: expected a redis://, rediss:// or unix:// URL',
    ),
    "verify on a pool location": (
        POOL + '[locations."/"]\nproxy_pass = "api"\nverify = false\n',
        '[locations."/"] verify: set verify in [upstreams.api]',
    ),
    "bad trusted proxy": (
        '[server]\ntrusted_proxies = ["10.0.0.300"]\n' + LOCATION,
        "[server] trusted_proxies: '10.0.0.300' is not an IP address",
    ),
    "bad log format": (
        '[server]\naccess_log_format = "$remote_addr $oops"\n' + LOCATION,
        "[server] access_log_format: unknown variable $oops; expected $http_NAME or one of",
    ),
    "missing certificate": (
        '[server]\ntls_certificate = "missing.pem"\n' + LOCATION,
        "[server] tls_certificate: cannot load the certificate and key: [Errno 2] No such file",
    ),
    "key without certificate": (
        '[server]\ntls_certificate_key = "key.pem"\n' + LOCATION,
        "[server] tls_certificate_key: set tls_certificate too",
    ),
    "access log directory": (
        '[server]\naccess_log = "no/such/dir/access.log"\n' + LOCATION,
        "[server] access_log: the directory",
    ),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text,message", list(MISTAKES.values()), ids=list(MISTAKES))
def test_a_mistake_is_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        build(load_config(path))
    assert str(info.value).startswith(f"{path}: {message}")
    assert isinstance(info.value, ValueError)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gone.toml: cannot read it: No such file"):
        load_config(tmp_path / "gone.toml")


def test_a_dict_is_called_config() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"locations": {"/": {"proxy_pass": 3}}})
    assert str(info.value) == 'config: [locations."/"] proxy_pass: expected a string, got 3'


def test_a_good_file_resolves(tmp_path: Path) -> None:
    built = build(load_config(write(tmp_path, GOOD)))
    assert [route.pattern for route in built.routes] == ["= /health", "/api/", "/"]
    pool = built.pools["api"]
    assert [server.weight for server in pool.servers] == [1, 2]
    assert pool.strategy == "least_conn"
    assert pool.health_check is not None and 204 in pool.health_check.expect_status
    api = built.proxies["/api/"]
    assert api.pool is pool
    assert api.max_body_size == 10 * 1024 * 1024
    assert api.request_headers == [(b"x-source", "gateway"), (b"cookie", None)]
    assert api.trusted_proxies.trusts("10.1.2.3")
    assert built.proxies["/"].timeout.read == 60
    assert [server.max_conns for server in pool.servers] == [0, 8]
    assert (pool.engine, pool.queue, pool.queue_timeout) == ("httpx", 20, 2.5)
    health = built.proxies["= /health"]
    assert health.pool.engine == "httpx" and built.proxies["/"].pool.engine == "httptools"
    assert api.cache is not None and api.cache.config == CacheConfig(
        path=str(tmp_path / "cache"),
        max_size=100 * 1024**2,
        inactive=None,
        use_stale=["error", "http_502"],
        status_header="X-Cached",
        lock_timeout=1,
    )
    assert health.cache is not None
    assert health.cache.config == CacheConfig(path=str(tmp_path / ".cache/asgi-proxy-pass"))
    assert built.proxies["/"].cache is None


@pytest.mark.parametrize("module,message", [
    ("hishel", 'cache: caching needs hishel; pip install "asgi-proxy-pass[cache]"'),
    ("redis", 'cache.redis_url: Redis storage needs redis; pip install "asgi-proxy-pass[cache-'),
])  # fmt: skip
def test_a_cache_without_its_extra_fails_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, message: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    path = write(tmp_path, LOCATION + 'cache = { redis_url = "redis://127.0.0.1:6379/0" }\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f'{path}: [locations."/"] {message}')


def test_the_cache_keys_are_cache_configs_fields() -> None:
    # A CacheConfig field the file cannot set (or the reference does not show) fails here.
    assert [key.name for key in CACHE] == [field.name for field in fields(CacheConfig)]
    assert CacheConfig(**check_table({}, CACHE, Where("config", "[cache]"))) == CacheConfig()


def test_the_example_file_is_valid() -> None:
    built = build(load_config(ROOT / "examples" / "gateway.toml"))
    assert [route.pattern for route in built.routes] == ["= /health", "/api/", "/"]
    assert len(built.pools["api"].servers) == 3


def test_relative_paths_start_at_the_file(tmp_path: Path, server_pem: str) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "gw.pem").write_bytes(Path(server_pem).read_bytes())
    config = load_config(write(tmp_path, '[server]\ntls_certificate = "certs/gw.pem"\n' + LOCATION))
    assert config.server["tls_certificate"] == str(tmp_path / "certs" / "gw.pem")


def test_check_prints_the_route_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: the configuration is valid\n")
    assert (
        "upstream api: least_conn, engine httpx, health check GET /healthz every 5s, "
        "queue 20 for 2.5s\n"
    ) in out
    assert "    Server('http://127.0.0.1:9001/', weight=2, max_conns=8)" in out
    table = out.split("locations, in the order they are tried:\n")[1].splitlines()
    assert [re.split(r"\s{2,}", line.strip()) for line in table] == [
        [
            "= /health",
            "->",
            "http://127.0.0.1:9100/status, engine httpx",
            "/health -> /status; cached",
        ],
        ["/api/", "->", "upstream api", "/api/x -> /x; /api -> 301 /api/; cached"],
        ["/", "->", "http://127.0.0.1:9100", "/x -> /x; no WebSockets"],
    ]


def test_check_fails_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, LOCATION + "websocket = 1\n")
    assert main(["--config", str(path), "--check"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f'asgi-proxy-pass: {path}: [locations."/"] websocket: expected a boolean, got 1\n'
        f"asgi-proxy-pass: {path}: test failed\n"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--to", "ftp://x"], "--to: expected an http://"),
        (["--to", "http://a/", "--to", "http://b/v2/"], "--to: 'http://b/v2/' and 'http://a/'"),
        (["--to", "http://a", "--to", "http://a:80"], "--to: the same server is given twice"),
        (["--to", "http://a", "--listen", "localhost"], '--listen: expected "HOST:PORT"'),
        (["--to", "http://a", "--prefix", "api"], "--prefix: expected a path prefix"),
    ],
)
def test_quick_form_mistakes_name_the_option(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*args, "--check"]) == 1
    assert capsys.readouterr().err.startswith(f"asgi-proxy-pass: {message}")


def test_quick_form_check(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--to", "http://127.0.0.1:9000", "--to", "http://127.0.0.1:9001", "--prefix", "/api"]
    assert main([*args, "--strip-prefix", "--check"]) == 0
    out = capsys.readouterr().out
    assert "listen      http://127.0.0.1:8080, 1 worker" in out
    assert "/api  ->  upstream to  /api/x -> /x" in out


@pytest.mark.parametrize(
    "args",
    [[], ["--config", "g.toml", "--to", "http://a"], ["--config", "g.toml", "--prefix", "/x"]],
)
def test_usage_mistakes_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "asgi-proxy-pass: error:" in capsys.readouterr().err


def generated() -> str:
    return f"{BEGIN}\n\n{reference(SECTIONS)}\n{END}"


def test_every_key_is_in_the_reference() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    current = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert current == generated(), (
        "docs/config-reference.md is out of date: run `python tests/test_config_file.py`"
    )


def test_every_log_variable_is_documented() -> None:
    from asgi_proxy_pass._accesslog import VARIABLES

    text = REFERENCE.read_text(encoding="utf-8")
    assert [name for name in VARIABLES if f"`${name}`" not in text] == []


if __name__ == "__main__":
    text = REFERENCE.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    REFERENCE.write_text(text[:start] + generated() + text[end:], encoding="utf-8")
    print(f"rewrote {REFERENCE}", file=sys.stderr)
