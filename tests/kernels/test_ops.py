"""The public custom ops: dispatch, fake implementations (opcheck), torch.compile. Imports: test_boundaries.py."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import activation, decode_attention, norm, prefill_attention, rope

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
        (decode_attention.paged_decode_attention_op, (a["q"], *caches, *paging, 0.125)),
        (
            prefill_attention.paged_prefill_attention_op,
            (a["q_prefill"], *caches, a["block_tables"], a["cu"], paging[1], 0.125),
        ),
    ]


PUBLIC = [kernels.rms_norm, kernels.fused_add_rms_norm, kernels.silu_and_mul, kernels.qk_norm_rope_store_kv,
          kernels.paged_decode_attention, kernels.paged_prefill_attention]  # op_calls' order  # fmt: skip


class DispatchedOps(TorchDispatchMode):
    """Records the namespace of every op that reaches the dispatcher (``makima`` for ours, ``aten`` for the
    PyTorch ops a reference is made of) and runs it unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.append(func.namespace)
        return func(*args, **(kwargs or {}))


def fresh(args):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in args]


@pytest.mark.parametrize("index", range(6), ids=["rms", "add_rms", "silu", "rope", "decode", "prefill"])
def test_cpu_eager_calls_skip_the_custom_op(index):
    """On CPU in eager mode the public function runs the reference's aten ops without our op's dispatch
    (which costs more than the reference there: ``eager_reference_on_cpu``). The same recorder sees the
    op when it is called directly, so it would see one the public function went through."""
    op, args = op_calls(small_inputs())[index]
    with DispatchedOps() as through_public:
        PUBLIC[index](*fresh(args))
    with DispatchedOps() as through_op:
        op(*fresh(args))
    assert "makima" not in through_public.namespaces and "aten" in through_public.namespaces
    assert "makima" in through_op.namespaces


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

    traced_ops: set[str] = set()

    def record_then_aot_eager(gm: torch.fx.GraphModule, example_inputs):
        # What Dynamo traced the public functions into: our ops, not the references' aten ops.
        traced_ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(layer, backend=record_then_aot_eager, fullgraph=True)
    eager_in = [t.clone() for t in (a["x"], a["residual"], a["qkv"], a["k_cache"], a["v_cache"])]
    compiled_in = [t.clone() for t in eager_in]
    torch.testing.assert_close(compiled(*compiled_in), layer(*eager_in))
    for c, e in zip(compiled_in, eager_in, strict=True):  # the in-place updates happen under compile too
        torch.testing.assert_close(c, e)
    ours = {"fused_add_rms_norm", "qk_norm_rope_store_kv", "paged_decode_attention", "silu_and_mul"}
    assert {f"makima.{name}.default" for name in ours} <= traced_ops, traced_ops


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_runs_triton():
    from kernels.norm import rms_norm_triton

    x = randn(4, 1024, dtype=torch.float16, device=torch.device("cuda"))
    w = randn(1024, dtype=torch.float16, device=torch.device("cuda"), seed=1)
    with DispatchedOps() as dispatched:  # on CUDA the public function goes through our op (graphs, compile)
        out = kernels.rms_norm(x, w, 1e-6)
    assert "makima" in dispatched.namespaces
    torch.testing.assert_close(out, rms_norm_triton(x, w, 1e-6), atol=0, rtol=0)

