"""The public custom ops: dispatch, fake implementations (opcheck), torch.compile. Imports: test_boundaries.py."""

import pytest
import torch

import kernels
from kernels import activation, decode_attention, norm, prefill_attention, rope
from kernels.decode_attention import paged_decode_attention_reference
from kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
from kernels.prefill_attention import paged_prefill_attention_reference

from .helpers import make_paged_kv, randn

CPU = torch.device("cpu")
HQ, HK, D = 4, 2, 64


def small_inputs(dtype=torch.float32):
    """One tiny layer's worth of arguments for every op, on CPU."""
    k_cache, v_cache, block_tables, ctx = make_paged_kv([5, 17, 1], HK, D, dtype, CPU)
    # NaN slots would make opcheck's comparisons of cache mutations meaningless; zero them.
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    return {
        "x": randn(3, 256, dtype=dtype, device=CPU),
        "residual": randn(3, 256, dtype=dtype, device=CPU, seed=1),
        "weight": randn(256, dtype=dtype, device=CPU, seed=2),
        "gate_up": randn(3, 2 * 96, dtype=dtype, device=CPU, seed=3),
        "qkv": randn(3, (HQ + 2 * HK) * D, dtype=dtype, device=CPU, seed=4),
        "positions": torch.tensor([4, 16, 0]),
        "cos_sin": kernels.rope_cos_sin_cache(64, D, 1e6),
        "qk_weight": randn(D, dtype=dtype, device=CPU, seed=5),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "block_tables": block_tables,
        "context_lens": ctx,
        "slots": torch.tensor(
            [int(block_tables[0, 0]) * 16 + 4, -1, int(block_tables[2, 0]) * 16], dtype=torch.int32
        ),
        "q": randn(3, HQ, D, dtype=dtype, device=CPU, seed=6),
        "q_prefill": randn(23, HQ, D, dtype=dtype, device=CPU, seed=7),
        "cu": torch.tensor([0, 5, 22, 23], dtype=torch.int32),
    }


def op_calls(a):
    """(custom op, args) for every public op: the registered ops themselves, which the public functions
    call on CUDA and under torch.compile."""
    caches, paging = (a["k_cache"], a["v_cache"]), (a["block_tables"], a["context_lens"])
    rope_args = (a["qkv"], a["positions"], a["cos_sin"], HQ, HK, a["qk_weight"], a["qk_weight"], 1e-6)
    return [
        (norm.rms_norm_op, (a["x"], a["weight"], 1e-6)),
        (norm.fused_add_rms_norm_op, (a["x"], a["residual"], a["weight"], 1e-6)),
        (activation.silu_and_mul_op, (a["gate_up"],)),
        (rope.qk_norm_rope_store_kv_op, (*rope_args, *caches, a["slots"])),
        (decode_attention.paged_decode_attention_op, (a["q"], *caches, *paging, 0.125, 0, 0)),
        (
            prefill_attention.paged_prefill_attention_op,
            (a["q_prefill"], *caches, a["block_tables"], a["cu"], paging[1], 0.125, 8),
        ),
    ]


def test_public_functions_equal_their_custom_ops_on_cpu():
    """On CPU the public functions skip the dispatcher; the answer must be the op's, bit for bit."""
    public = [kernels.rms_norm, kernels.fused_add_rms_norm, kernels.silu_and_mul, kernels.qk_norm_rope_store_kv,
              kernels.paged_decode_attention, kernels.paged_prefill_attention]
    for fn, (op, args) in zip(public, op_calls(small_inputs()), strict=True):
        direct_args = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        op_args = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]
        torch.testing.assert_close(fn(*direct_args), op(*op_args), atol=0, rtol=0)
        for d, o in zip(direct_args, op_args, strict=True):  # in-place updates (rope: qkv and caches) too
            if isinstance(d, torch.Tensor):
                torch.testing.assert_close(d, o, atol=0, rtol=0, equal_nan=True)


def test_cpu_dispatch_runs_the_references():
    a = small_inputs()
    torch.testing.assert_close(
        kernels.rms_norm(a["x"], a["weight"], 1e-6), rms_norm_reference(a["x"], a["weight"], 1e-6)
    )
    out, res = kernels.fused_add_rms_norm(a["x"], a["residual"], a["weight"], 1e-6)
    ref_out, ref_res = fused_add_rms_norm_reference(a["x"], a["residual"], a["weight"], 1e-6)
    torch.testing.assert_close((out, res), (ref_out, ref_res))
    args = (a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["context_lens"], 0.125)
    torch.testing.assert_close(kernels.paged_decode_attention(*args), paged_decode_attention_reference(*args))
    args = (a["q_prefill"], a["k_cache"], a["v_cache"], a["block_tables"], a["cu"], a["context_lens"], 0.125)
    torch.testing.assert_close(
        kernels.paged_prefill_attention(*args), paged_prefill_attention_reference(*args)
    )


@pytest.mark.parametrize("index", range(6), ids=["rms", "add_rms", "silu", "rope", "decode", "prefill"])
def test_opcheck(index):
    # Schema (declared mutations), fake implementation vs real output, dynamic-shape tracing.
    op, args = op_calls(small_inputs())[index]
    torch.library.opcheck(
        op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    )


def test_compiles_as_opaque_ops():
    """A whole Qwen3-style layer of our ops traces into one graph with no breaks."""
    a = small_inputs()

    def layer(x, residual, qkv, k_cache, v_cache):
        h, residual = kernels.fused_add_rms_norm(x, residual, a["weight"], 1e-6)
        rope_args = (a["positions"], a["cos_sin"], HQ, HK, a["qk_weight"], a["qk_weight"], 1e-6)
        kernels.qk_norm_rope_store_kv(qkv, *rope_args, k_cache, v_cache, a["slots"])
        q = qkv.view(3, HQ + 2 * HK, D)[:, :HQ]
        attn = kernels.paged_decode_attention(
            q, k_cache, v_cache, a["block_tables"], a["context_lens"], 0.125
        )
        return kernels.silu_and_mul(h) + attn.sum(), residual

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    eager_in = [t.clone() for t in (a["x"], a["residual"], a["qkv"], a["k_cache"], a["v_cache"])]
    compiled_in = [t.clone() for t in eager_in]
    torch.testing.assert_close(compiled(*compiled_in), layer(*eager_in))
    for c, e in zip(compiled_in, eager_in, strict=True):  # the in-place updates happen under compile too
        torch.testing.assert_close(c, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_runs_triton():
    from kernels.norm import rms_norm_triton

    x = randn(4, 1024, dtype=torch.float16, device=torch.device("cuda"))
    w = randn(1024, dtype=torch.float16, device=torch.device("cuda"), seed=1)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_triton(x, w, 1e-6), atol=0, rtol=0)

