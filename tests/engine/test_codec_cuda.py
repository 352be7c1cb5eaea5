"""The lockstep codec on CUDA: replayed from CUDA graphs per bucket, equal to the one-pass decode on CPU.

Skipped without a GPU; `bench/gpu_check.sh codec` runs it when one is lent.
"""

import numpy as np
import pytest
import torch

from engine.codec_stream import CodecStream
from engine.model import TTSModel

from .test_codec_stream import SCHEDULE, SPF, TOL, FakeClock, check_chunks, mixed, one_pass, samples, stream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_tok(tiny_checkpoint):
    return TTSModel.load(tiny_checkpoint, device="cuda").speech_tokenizer  # the codec is fp32 on every device


def test_every_bucket_is_a_captured_graph(cuda_tok):
    cs = CodecStream(cuda_tok, SCHEDULE, SPF, capacity=8)
    assert cs.decoder.buckets == [1, 2, 4, 8]
    assert all(call.graph is not None for call in cs.decoder._calls.values())
    assert all(t.device.type == "cuda" for t in cs.decoder.pool.tensors.values())


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_replayed_streams_equal_the_cpu_one_pass_decode(cuda_tok, tiny_model, cuda_graphs):
    requests = mixed(seed=5)  # plain and ICL, staggered, more streams than some buckets: padding rows
    cs = CodecStream(cuda_tok, SCHEDULE, SPF, clock=FakeClock(0.001), capacity=8, cuda_graphs=cuda_graphs)
    assert all(hasattr(call, "graph") == cuda_graphs for call in cs.decoder._calls.values())
    chunks = stream(cuda_tok, requests, cs=cs)
    assert cs.calls == max(start + len(gen) for _, gen, start in requests.values())  # one call per step
    for rid, (ref, gen, _) in requests.items():
        check_chunks(chunks[rid], len(gen), SCHEDULE)
        got = samples(chunks[rid])
        assert got.dtype == np.float32
        assert np.abs(got - one_pass(tiny_model.speech_tokenizer, gen, ref)).max() <= TOL, rid
