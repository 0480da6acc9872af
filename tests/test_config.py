"""Bad configuration raises at construction, naming the argument."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from asgi_proxy_pass import ConfigError, ProxyPass


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"upstream": "ftp://x"}, "upstream: expected an http://"),
        ({"upstream": "http://x/?a=1"}, "upstream: a query string"),
        ({"strip_prefix": 3}, "strip_prefix: expected bool, str or None, got 3"),
        ({"strip_prefix": "api"}, "strip_prefix: a prefix must start with '/'"),
        ({"timeout": -1}, "timeout: the connect timeout must be positive"),
        ({"timeout": "5"}, "timeout: expected seconds or an httpx2.Timeout"),
        ({"timeout": httpx2.Timeout(5, read=0)}, "timeout: the read timeout must be positive"),
        ({"trusted_proxies": ["x"]}, "trusted_proxies: 'x' is not an IP address"),
        ({"request_headers": {"Bad Name": "x"}}, "request_headers: 'Bad Name' is not a valid"),
        ({"request_headers": {"X-A": "a\r\nb"}}, "request_headers: the value of 'X-A' contains"),
        ({"response_headers": {"X-A": 3}}, "response_headers: the value of 'X-A' must be"),
        ({"max_body_size": -1}, "max_body_size: expected a number of bytes"),
        ({"verify": "/no/such/ca.pem"}, "verify: no CA bundle file or directory"),
        ({"verify": 3}, "verify: expected a bool"),
        ({"cert": "/no/such/cert.pem"}, "cert: cannot load the client certificate"),
        ({"limits": 3}, "limits: expected an httpx2.Limits"),
        ({"transport": object()}, "transport: expected an httpx2.AsyncBaseTransport"),
        ({"websocket_max_size": -1}, "websocket_max_size: expected a number of bytes"),
        ({"websocket_ping_interval": 0}, "websocket_ping_interval: expected positive seconds"),
        ({"websocket_compression": "gzip"}, "websocket_compression: expected 'deflate' or None"),
    ],
)
def test_invalid_configuration(kwargs: dict[str, Any], message: str) -> None:
    upstream = kwargs.pop("upstream", "https://b/")
    with pytest.raises(ConfigError) as info:
        ProxyPass(upstream, **kwargs)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)


def test_repr() -> None:
    assert repr(ProxyPass("http://b:1/v2/")) == "ProxyPass('http://b:1/v2/')"
