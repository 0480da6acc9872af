"""The `asgi-proxy-pass` command (also `python -m asgi_proxy_pass`).

    asgi-proxy-pass --to URL [--to URL ...] [--listen ADDR] [--prefix PATH] [--strip-prefix]
    asgi-proxy-pass --config gateway.toml [--check]
    asgi-proxy-pass demo [--listen ADDR]

The quick form is a one-location configuration made from the options; several `--to` make a
round-robin pool. Either form is checked whole before anything listens. Exit status: 0 after a
requested stop (SIGTERM, Ctrl-C) or a passing `--check`, 1 for a configuration that cannot run
(the message names the file, table and key), 2 for a misused command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._config import GatewayConfig, load_config
from ._errors import ConfigError
from ._gateway import build, describe
from ._keys import parse_listen, parse_location
from ._schema import Invalid
from ._serve import serve
from ._urls import parse_upstream

__all__ = ["main", "quick_config"]

USAGE = """\
asgi-proxy-pass --to URL [--to URL ...] [--listen ADDR] [--prefix PATH] [--strip-prefix]
       asgi-proxy-pass --config FILE [--check]
       asgi-proxy-pass demo [--listen ADDR]"""

DESCRIPTION = """\
nginx's proxy_pass as a command: a streaming HTTP and WebSocket reverse proxy.

  asgi-proxy-pass --listen 127.0.0.1:8080 --to http://127.0.0.1:9000
      forwards everything on port 8080 to one upstream
  asgi-proxy-pass --config gateway.toml
      runs the pools and locations of a configuration file
  asgi-proxy-pass demo
      starts two toy backends and a gateway in front of them, to try it out"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asgi-proxy-pass",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Documentation: docs/cli.md and docs/config-reference.md",
    )
    quick = parser.add_argument_group("the quick form")
    quick.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="URL",
        help="the upstream URL; repeat it for a round-robin pool",
    )
    quick.add_argument(
        "--listen",
        metavar="ADDR",
        help='HOST:PORT or unix:/PATH to listen on (default "127.0.0.1:8080")',
    )
    quick.add_argument(
        "--prefix", default="/", metavar="PATH", help='the location to proxy (default "/")'
    )
    quick.add_argument(
        "--strip-prefix",
        action="store_true",
        help="remove the prefix before forwarding (by default only a URL with a path does)",
    )
    form = parser.add_argument_group("the configuration file")
    form.add_argument("--config", metavar="FILE", help="a TOML configuration file")
    form.add_argument(
        "--check",
        action="store_true",
        help="check the configuration, print the resolved routes and exit (nginx -t)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["demo"]:
        from ._demo import main as demo

        return demo(args[1:])
    parser = _parser()
    options = parser.parse_args(args)
    if options.config is not None:
        quick = [name for name in ("to", "listen") if getattr(options, name)]
        quick += ["prefix"] if options.prefix != "/" else []
        quick += ["strip_prefix"] if options.strip_prefix else []
        if quick:
            option = "--" + quick[0].replace("_", "-")
            parser.error(f"{option} is for the quick form; with --config, set it in the file")
    elif not options.to:
        parser.error("give --to URL (the quick form) or --config FILE")
    source = options.config or "command line"
    try:
        config = load_config(options.config) if options.config else quick_config(options)
        built = build(config)
    except ConfigError as exc:
        print(f"asgi-proxy-pass: {exc}", file=sys.stderr)
        if options.check:
            print(f"asgi-proxy-pass: {source}: test failed", file=sys.stderr)
        return 1
    if options.check:
        print(describe(built))
        return 0
    try:
        return serve(built)
    except ConfigError as exc:
        print(f"asgi-proxy-pass: {exc}", file=sys.stderr)
        return 1


def quick_config(options: argparse.Namespace) -> GatewayConfig:
    """The configuration the quick form's options stand for.

    Raises:
        ConfigError: naming the option (`--to: ...`).
    """
    listen = options.listen or "127.0.0.1:8080"
    try:
        parse_listen(listen)
    except Invalid as exc:
        raise ConfigError(f"--listen: {exc}") from None
    try:
        parse_location(options.prefix)
    except Invalid as exc:
        raise ConfigError(f"--prefix: {exc}") from None
    urls = [parse_upstream(url, argument="--to") for url in options.to]
    for url in urls[1:]:
        if (url.scheme, url.path) != (urls[0].scheme, urls[0].path):
            raise ConfigError(
                f"--to: {url.url!r} and {urls[0].url!r} differ in scheme or path; "
                "the servers of a pool share both"
            )
    if len({url.address for url in urls}) < len(urls):
        raise ConfigError("--to: the same server is given twice")
    location: dict[str, Any] = {"proxy_pass": options.to[0]}
    data: dict[str, Any] = {"server": {"listen": listen}, "locations": {options.prefix: location}}
    if len(urls) > 1:
        data["upstreams"] = {"to": {"servers": options.to}}
        location["proxy_pass"] = "to"
    if options.strip_prefix:
        location["strip_prefix"] = True
    return load_config(data, source="command line")
