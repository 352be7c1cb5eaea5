"""Reliability suite: async tests run in a fresh event loop under a time limit (no plugin), every
test's numbers are collected by the ``report`` fixture, printed as one line per test at the end of
the run (no -s needed) and written to ``<pytest basetemp>/reliability.json``.

Everything is loopback only and stops by itself: each test has a hard time limit, subprocesses
are killed on the way out.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest

from tests.coroutine_tests import run_coroutine_test

# Hypothesis keeps its files outside the checkout (the fuzz tests also pass database=None).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "makima-hypothesis"))

DEFAULT_TIMEOUT_S = 60.0
RESULTS = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    return run_coroutine_test(pyfuncitem, DEFAULT_TIMEOUT_S)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): time limit of an async reliability test")
    config.stash[RESULTS] = []


@pytest.fixture(scope="session")
def tiny_engine_shared(tmp_path_factory):
    """One real engine (tiny random checkpoint) for every in-process test that does not break it."""
    from tests.reliability.inproc import tiny_engine

    engine = tiny_engine(tmp_path_factory.mktemp("tiny-shared"))
    yield engine
    engine.shutdown()


@pytest.fixture
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A dict the test fills with its numbers; printed and saved when the test ends (pass or fail)."""
    numbers: dict = {}
    yield numbers
    if not numbers:
        return
    entry = {"test": request.node.nodeid.split("::", 1)[-1], **numbers}
    request.config.stash[RESULTS].append(entry)
    print("\nRELIABILITY " + _line(entry))
    path = tmp_path_factory.getbasetemp() / "reliability.json"
    path.write_text(json.dumps(request.config.stash[RESULTS], indent=1) + "\n")


def _line(entry: dict) -> str:
    return entry["test"] + ": " + ", ".join(f"{k}={v}" for k, v in entry.items() if k != "test")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS, [])
    if results:
        terminalreporter.section("reliability numbers")
        for entry in results:
            terminalreporter.write_line(_line(entry))
