"""``async def`` tests without a plugin: each runs in a fresh event loop under a time limit (its
``@pytest.mark.timeout(S)`` if it has one, else the suite's default). A conftest's
``pytest_pyfunc_call`` hook hands its tests here."""

from __future__ import annotations

import asyncio
import inspect

import pytest


def run_coroutine_test(pyfuncitem: pytest.Function, default_timeout_s: float) -> bool | None:
    """Run ``pyfuncitem`` if it is a coroutine function and return True; None lets pytest run it."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    limit = pyfuncitem.get_closest_marker("timeout")
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), limit.args[0] if limit else default_timeout_s))
    return True
