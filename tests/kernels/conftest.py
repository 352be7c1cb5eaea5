"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else in the Triton interpreter on CPU.

``@triton.jit`` picks interpreter or compiler when it decorates, so TRITON_INTERPRET must be set before
the kernel modules are first imported: here, at the top, before anything imports ``kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import _common  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_built_for_this_machine() -> None:
    # Some other module imported kernels before this file ran (without the variable): every launch on
    # CPU tensors would fail with "0 active drivers". Say why, once per test, instead.
    if not torch.cuda.is_available() and not _common.INTERPRETED:
        pytest.fail("kernels was imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poison_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``torch.empty`` return NaN-filled floats (and huge ints), so an element a kernel forgets to
    write fails the comparison instead of passing on a lucky zero."""
    original = torch.empty

    def poisoned(*args, **kwargs):
        t = original(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else 2**30 - 1)

    monkeypatch.setattr(torch, "empty", poisoned)
