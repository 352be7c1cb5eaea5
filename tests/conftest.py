"""Shared pytest setup.

Slow tests (full-size checkpoints, long interpreter runs) are skipped by default and run with
``--runslow`` or when ``CI=true`` (what ``.ci/run`` sets), so CI runs everything.
"""

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. This must be set before any module
# imports triton-jitted code (engine/ imports kernels/ at module level).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The weight format the engine picks depends on the CPU (engine/precision.py). The suite pins the
# fp32 path (what an AVX2-only CPU gets) so that every test sees the same numbers on every machine;
# tests/engine/test_precision.py forces each other path itself.
os.environ.setdefault("MAKIMA_CPU_ISA", "avx2")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() == "true":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
