from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2

# respx patches `httpx`; make that name mean httpx2 before anything imports it.
httpx2.alias_httpx()

import pytest  # noqa: E402
import trustme  # noqa: E402
from servers import Running, echo_app, serve  # noqa: E402

from asgi_proxy_pass import _engine  # noqa: E402


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # uvicorn, the servers under test, runs on asyncio only.
    return "asyncio"


# The end-to-end HTTP modules run once per engine, as uvicorn runs its tests over h11 and
# httptools: every wire rule must hold for both.
ENGINE_MODULES = frozenset(
    {"test_http", "test_failover", "test_tls", "test_faults", "test_hostile"}
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "engine" in metafunc.fixturenames and metafunc.module.__name__ in ENGINE_MODULES:
        metafunc.parametrize("engine", _engine.ENGINES, indirect=True)


@pytest.fixture(autouse=True)
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The HTTP engine of every `Upstream` and `ProxyPass` made without `engine=`."""
    name: str = getattr(request, "param", _engine.DEFAULT_ENGINE)
    monkeypatch.setattr(_engine, "DEFAULT_ENGINE", name)
    return name


@pytest.fixture
async def echo() -> AsyncIterator[Running]:
    """An upstream that describes the request it received."""
    async with serve(echo_app) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
        yield c


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A certificate for 127.0.0.1 and localhost, key and chain in one PEM file."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(path))
    yield str(path)


@pytest.fixture(scope="session")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
