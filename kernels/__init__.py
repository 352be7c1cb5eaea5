"""Triton kernels for a Qwen3-style decoder, each a ``torch.library`` custom op (namespace ``makima``).

On CUDA tensors the ops launch Triton kernels; on anything else they run the plain PyTorch reference of
the same signature, so one call site serves the GPU engine, the CPU engine, ``torch.compile`` and CUDA
graphs. (On CPU in eager mode the public functions call the references without the custom-op dispatch,
which costs more than the ops there; ``<name>_op`` in each module is the registered op.) The library
knows nothing of any model; see ``kernels/README.md`` for layouts and tolerances.
"""

from .activation import silu_and_mul
from .decode_attention import paged_decode_attention
from .norm import fused_add_rms_norm, rms_norm
from .prefill_attention import paged_prefill_attention
from .rope import qk_norm_rope_store_kv, rope_cos_sin_cache

__all__ = [
    "fused_add_rms_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "qk_norm_rope_store_kv",
    "rms_norm",
    "rope_cos_sin_cache",
    "silu_and_mul",
]
