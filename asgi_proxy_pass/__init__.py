"""nginx's `proxy_pass` as an ASGI app: a streaming HTTP and WebSocket reverse proxy."""

from ._accesslog import AccessLog
from ._cache import Cache, CacheConfig
from ._errors import (
    BadRequest,
    BodyTooLarge,
    ClientDisconnected,
    ClientError,
    ConfigError,
    HeadersTooLarge,
    NotFound,
    ProxyPassError,
    UnsupportedTransferCoding,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ._gateway import gateway
from ._health import HealthCheck
from ._proxy import DEFAULT_TIMEOUT, ProxyPass, lifespan
from ._upstream import DEFAULT_LIMITS, NoLiveUpstreams, Server, Upstream, UpstreamsBusy

__version__ = "0.1.0"

__all__ = [
    "AccessLog",
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "BadRequest",
    "BodyTooLarge",
    "Cache",
    "CacheConfig",
    "ClientDisconnected",
    "ClientError",
    "ConfigError",
    "HeadersTooLarge",
    "HealthCheck",
    "NoLiveUpstreams",
    "NotFound",
    "ProxyPass",
    "ProxyPassError",
    "Server",
    "UnsupportedTransferCoding",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRefused",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamsBusy",
    "__version__",
    "gateway",
    "lifespan",
]
