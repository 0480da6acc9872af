import asgi_proxy_pass


def test_all_exports_are_public_and_documented() -> None:
    for name in asgi_proxy_pass.__all__:
        member = getattr(asgi_proxy_pass, name)
        assert member is not None, name
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"
            assert member.__module__.startswith("asgi_proxy_pass"), name


def test_no_unlisted_public_names() -> None:
    public = {n for n in dir(asgi_proxy_pass) if not n.startswith("_")}
    assert public == set(asgi_proxy_pass.__all__) - {"__version__"}
