"""TLS settings for https upstreams: `verify=` and `cert=` turned into one `ssl.SSLContext`.

Verification is on by default, against the system trust store; SNI is the upstream host name
(nginx has both off: `proxy_ssl_verify off`, `proxy_ssl_server_name off`).
"""

from __future__ import annotations

import os
import ssl
from typing import TypeAlias

from ._errors import ConfigError

__all__ = ["CertTypes", "VerifyTypes", "ssl_context"]

VerifyTypes: TypeAlias = bool | str | os.PathLike[str] | ssl.SSLContext
CertTypes: TypeAlias = str | tuple[str, str] | tuple[str, str, str]


def ssl_context(verify: VerifyTypes, cert: CertTypes | None) -> ssl.SSLContext:
    """The context for connecting to https upstreams.

    Args:
        verify: True (system trust), False (no verification, nginx's default), a CA bundle file
            or directory, or a ready `ssl.SSLContext` (used as is).
        cert: A client certificate: a PEM path, `(certfile, keyfile)` or
            `(certfile, keyfile, password)` (nginx `proxy_ssl_certificate`).

    Raises:
        ConfigError: the message starts with `verify:` or `cert:`.
    """
    if isinstance(verify, ssl.SSLContext):
        if cert is not None:
            raise ConfigError("cert: load the certificate into the ssl.SSLContext given as verify=")
        return verify
    if verify is True:
        context = ssl.create_default_context()
    elif verify is False:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if os.path.isdir(path):
            context = ssl.create_default_context(capath=path)
        elif os.path.isfile(path):
            context = ssl.create_default_context(cafile=path)
        else:
            raise ConfigError(f"verify: no CA bundle file or directory at {path!r}")
    else:
        raise ConfigError(
            f"verify: expected a bool, a CA bundle path or an SSLContext, got {verify!r}"
        )
    if cert is not None:
        files = (cert,) if isinstance(cert, str) else cert
        try:
            context.load_cert_chain(*files)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cert: cannot load the client certificate {cert!r}: {exc}") from None
    return context
