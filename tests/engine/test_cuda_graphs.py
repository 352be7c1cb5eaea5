"""The CUDA-graph decode path (engine/cuda_graphs.py) gives the eager path's codes.

Off CUDA each "graph" is its function called on the same static buffers, so these tests check what the
graphs add besides capture: the bucket padding, the input copies, the baked per-sub-step cache lengths
and the fixed-width block tables. tests/engine/test_cuda.py runs the same comparison with real graphs.
"""

import numpy as np
import pytest
import torch

from engine.codec_stream import CodecStream
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.engine import Engine

from .test_engine import greedy, mixed_requests, run_all


def graphed_engine(model, max_batch: int) -> tuple[Engine, dict[str, int]]:
    engine = Engine(model, EngineConfig(num_kv_blocks=256, max_batched_tokens=64, chunk_frames=(1, 2, 4),
                                        max_running=max_batch))
    graphs = engine.runner.graphs
    if graphs is None:  # CPU: the engine runs eagerly, so put the graph path in by hand
        graphs = engine.runner.graphs = DecodeGraphs(model.tts.talker, engine.kv, max_batch,
                                                     engine.cfg.max_sequence_len)
    calls = {"talker": 0, "predictor": 0}
    talker_decode, predictor_substep = graphs.talker_decode, graphs.predictor_substep

    def count_talker(*args):
        calls["talker"] += 1
        return talker_decode(*args)

    def count_predictor(*args):
        calls["predictor"] += 1
        return predictor_substep(*args)

    graphs.talker_decode, graphs.predictor_substep = count_talker, count_predictor
    return engine, calls


def test_buckets_cover_every_batch_up_to_the_largest(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=64, max_running=20))
    try:
        graphs = DecodeGraphs(tiny_model.tts.talker, engine.kv, 20, 256)
        assert graphs.buckets == [1, 2, 4, 8, 12, 16, 20]
        assert [graphs._bucket(n) for n in (1, 3, 5, 9, 13, 17, 20)] == [1, 4, 8, 12, 16, 20, 20]
        assert graphs.fits(20) and not graphs.fits(21) and not graphs.fits(0)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seeded", [False, True])
def test_graph_path_codes_equal_the_eager_path(tiny_model, voices_for_graphs, seeded):
    requests = mixed_requests(voices_for_graphs, 7)  # 7 sessions: buckets 8, then 4, 2, 1 as they finish
    for i, r in enumerate(requests):
        r.sampling = tiny_model.sampling(seed=100 + i) if seeded else greedy(tiny_model)
    eager = Engine(tiny_model, EngineConfig(num_kv_blocks=256, max_batched_tokens=64, chunk_frames=(1, 2, 4)))
    try:
        expected = run_all(eager, requests, stagger=0.01)
    finally:
        eager.shutdown()
    engine, calls = graphed_engine(tiny_model, max_batch=8)
    try:
        for r in requests:
            r.request_id += "-graphed"
        results = run_all(engine, requests, stagger=0.01)
        assert engine.blocks.num_used == 0
    finally:
        engine.shutdown()
    for (_, want), (chunks, got) in zip(expected, results, strict=True):
        assert np.array_equal(got.codes, want.codes), got.request_id
        assert sum(c.samples.shape[0] for c in chunks) == 1920 * got.frames
    # Decode-only steps went through the graphs (steps with prefill rows run eagerly).
    assert calls["talker"] > 0 and calls["predictor"] > 0
    assert calls["predictor"] % 15 == 0


def test_batches_above_the_largest_bucket_run_eagerly(tiny_model, voices_for_graphs):
    requests = mixed_requests(voices_for_graphs, 5)
    for r in requests:
        r.sampling, r.max_frames = greedy(tiny_model), 8
    engine, calls = graphed_engine(tiny_model, max_batch=2)
    engine.cfg = EngineConfig(**{**engine.cfg.__dict__, "max_running": 8})
    engine.scheduler.cfg = engine.cfg
    # The codec's state pool is sized for max_running at start as well: give it room for the 8.
    engine.codec.shutdown()
    engine.codec = CodecStream(tiny_model.speech_tokenizer, engine.cfg.chunk_frames, 1920, capacity=8,
                               cuda_graphs=engine.cfg.cuda_graphs)
    try:
        results = run_all(engine, requests)
    finally:
        engine.shutdown()
    for req, (_, fin) in zip(requests, results, strict=True):
        alone = tiny_model.synthesize(req.text, req.voice, req.language, greedy(tiny_model), req.max_frames,
                                      req.non_streaming_text)
        assert np.array_equal(fin.codes, alone.codes.numpy()), req.request_id


@pytest.fixture(scope="module")
def voices_for_graphs(tiny_model):
    t = np.arange(30000) / 24000
    wave = (0.3 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 2 * t)).astype(np.float32)
    return {"icl": tiny_model.voice_prompt(wave, "Reference voice."),
            "xvec": tiny_model.voice_prompt(wave, x_vector_only=True)}


def test_padding_rows_write_no_kv(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=16, max_running=4))
    try:
        graphs = DecodeGraphs(tiny_model.tts.talker, engine.kv, 4, 256)
        before = [k.clone() for k in engine.kv.k]
        from engine.paged_context import PagedContext

        hidden = tiny_model.cfg.talker.transformer.hidden_size
        x = torch.randn(3, hidden)
        ctx = PagedContext(cache=engine.kv, cos_sin=graphs.cos_sin, eps=1e-6, positions=torch.tensor([0, 0, 0]),
                           slot_mapping=torch.tensor([16, 32, 48]), block_tables=torch.tensor([[1], [2], [3]],
                                                                                             dtype=torch.int32),
                           context_lens=torch.ones(3, dtype=torch.int32), cu_seqlens_q=None)
        with torch.inference_mode():
            out = graphs.talker_decode(x, ctx)
            eager = tiny_model.tts.talker.model(x, ctx)
        assert out.shape == (3, hidden) and torch.allclose(out, eager, atol=1e-5)
        for layer, k in enumerate(engine.kv.k):
            changed = (k != before[layer]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == [1, 2, 3]  # the 3 real rows' blocks; the padded 4th row wrote nothing
    finally:
        engine.shutdown()
