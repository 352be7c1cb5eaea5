"""Every kernel compiles for an H100 (sm_90) through Triton and ptxas, even on a machine with no GPU."""

import os
import pathlib
import subprocess
import sys

import pytest

from .gpu_compile import CUOBJDUMP

REPO = pathlib.Path(__file__).resolve().parents[2]


def compile_for(arch: int, dtypes: list[str]) -> None:
    # A fresh process: this one imported kernels under the interpreter, which never compiles.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.gpu_compile", "--arch", str(arch), "--dtypes", *dtypes],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


needs_toolchain = pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this triton wheel has no ptxas")


@needs_toolchain
def test_bf16_kernels_compile_for_sm90_without_spills():
    compile_for(90, ["bfloat16"])  # the serving dtype


@needs_toolchain
@pytest.mark.slow
def test_all_dtypes_compile_for_sm90():
    compile_for(90, ["bfloat16", "float16", "float32"])
