"""nginx's `proxy_pass` as an ASGI app: a streaming HTTP and WebSocket reverse proxy."""

from ._errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ClientError,
    ConfigError,
    NotFound,
    ProxyPassError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._health import HealthCheck
from ._proxy import DEFAULT_TIMEOUT, ProxyPass, lifespan
from ._upstream import DEFAULT_LIMITS, NoLiveUpstreams, Server, Upstream

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "BadRequest",
    "BodyTooLarge",
    "ClientDisconnected",
    "ClientError",
    "ConfigError",
    "HealthCheck",
    "NoLiveUpstreams",
    "NotFound",
    "ProxyPass",
    "ProxyPassError",
    "Server",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "__version__",
    "lifespan",
]
