"""`python -m asgi_proxy_pass`: the `asgi-proxy-pass` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
