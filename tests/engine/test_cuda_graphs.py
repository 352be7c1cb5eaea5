"""The static decode path (engine/cuda_graphs.py) gives the eager path's codes, and every decode row takes it.

Off CUDA each "graph" is its function called on the same static buffers, so these tests check what the
graphs add besides capture: the bucket padding, the slot rows and their masks, the persistent inputs, the
baked per-sub-step cache lengths and the fixed-width block tables. tests/engine/test_cuda.py runs the same
comparison with real graphs.
"""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine

from .test_engine import greedy, mixed_requests, run_all


def static_engine(model, max_running: int, **cfg) -> tuple[Engine, list[tuple[int, int, int]]]:
    """An engine whose steps are recorded as (decode rows, prefill rows, frames sampled)."""
    engine = Engine(model, EngineConfig(num_kv_blocks=256, max_batched_tokens=64, chunk_frames=(1, 2, 4),
                                        max_running=max_running, **cfg))
    steps: list[tuple[int, int, int]] = []
    real = engine.runner.step

    def step(plan):
        out = real(plan)
        steps.append((len(plan.decodes), sum(it.num_rows for it in plan.prefills), len(out.sampled)))
        return out

    engine.runner.step = step
    return engine, steps


def test_buckets_cover_every_batch_up_to_the_largest(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=64, max_running=20))
    try:
        decode = engine.runner.decode
        assert decode.buckets == [1, 2, 4, 8, 12, 16, 20]
        assert [decode.rows_for(n) for n in (1, 3, 5, 9, 13, 17, 20)] == [1, 4, 8, 12, 16, 20, 20]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seeded", [False, True])
def test_static_path_codes_equal_the_eager_path(tiny_model, voices_for_graphs, seeded):
    requests = mixed_requests(voices_for_graphs, 7)  # 7 sessions: buckets 8, then 4, 2, 1 as they finish
    for i, r in enumerate(requests):
        r.sampling = tiny_model.sampling(seed=100 + i) if seeded else greedy(tiny_model)
    eager, _ = static_engine(tiny_model, 8, cuda_graphs=False)
    try:
        expected = run_all(eager, requests, stagger=0.01)
        assert eager.stats().counters["decode_rows{path=static}"] == 0
    finally:
        eager.shutdown()
    engine, steps = static_engine(tiny_model, 8)
    try:
        for r in requests:
            r.request_id += "-static"
        results = run_all(engine, requests, stagger=0.01)
        assert engine.blocks.num_used == 0
        counters = engine.stats().counters
    finally:
        engine.shutdown()
    for (_, want), (chunks, got) in zip(expected, results, strict=True):
        assert np.array_equal(got.codes, want.codes), got.request_id
        assert sum(c.samples.shape[0] for c in chunks) == 1920 * got.frames
    # Every decode row went through the static path, also in steps that carried prefill rows.
    assert counters["decode_rows{path=static}"] == sum(d for d, _, _ in steps) > 0
    assert counters["decode_rows{path=eager}"] == 0
    assert counters["prefill_rows"] == sum(p for _, p, _ in steps)
    assert counters["host_syncs"] == sum(1 for _, _, n in steps if n)  # one device→host copy per step


def test_a_prefill_beside_decodes_keeps_them_static(tiny_model, voices_for_graphs):
    """Staggered arrivals: steps that mix prefill chunks and decode rows happen, and their decode rows are
    still counted static (the old engine ran every such step eagerly)."""
    requests = mixed_requests(voices_for_graphs, 6)
    for r in requests:
        r.sampling, r.max_frames = greedy(tiny_model), 10
    engine, steps = static_engine(tiny_model, 8)
    decode, through_static = engine.runner.decode, []
    real = decode.talker_decode

    def talker_decode(b):  # the rows the bucket's static function decoded
        assert b in decode.buckets
        through_static.append(int(engine.runner.buf.decoding.dev[:b].sum()))
        return real(b)

    decode.talker_decode = talker_decode
    try:
        results = run_all(engine, requests, stagger=0.02)
        counters = engine.stats().counters
    finally:
        engine.shutdown()
    assert any(d and p for d, p, _ in steps), steps
    assert sum(through_static) == sum(d for d, _, _ in steps) == counters["decode_rows{path=static}"]
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


def test_padding_rows_write_no_kv_and_keep_their_state(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=16, max_running=4))
    try:
        runner = engine.runner
        buf, decode = runner.buf, runner.decode
        before = [k.clone() for k in engine.kv.k]
        hidden = tiny_model.cfg.talker.transformer.hidden_size
        buf.x[:4] = torch.randn(4, hidden)
        buf.hidden[3] = 7.0  # slot 3 is padding this step: its hidden state must survive
        for slot in range(3):  # slots 0..2 decode position 0 of blocks 1..3
            buf.claim(slot, object(), 0)
            buf.write_table(slot, [slot + 1])
            buf.positions.np[slot], buf.slot_mapping.np[slot] = 0, buf.kv_slot(slot, 0, engine.kv.block_size)
            buf.context_lens.np[slot], buf.decoding.np[slot] = 1, True
        buf.slot_mapping.np[3], buf.context_lens.np[3], buf.decoding.np[3] = -1, 1, False
        buf.upload_decode(4)
        assert buf.slot_mapping.np[:3].tolist() == [16, 32, 48]
        with torch.inference_mode():
            decode.talker_decode(4)
            from engine.paged_context import PagedContext
            ctx = PagedContext(cache=engine.kv, cos_sin=decode.cos_sin, eps=1e-6, positions=torch.tensor([0, 0, 0]),
                               slot_mapping=torch.tensor([16, 32, 48]),
                               block_tables=torch.tensor([[1], [2], [3]], dtype=torch.int32),
                               context_lens=torch.ones(3, dtype=torch.int32), cu_seqlens_q=None)
            eager = tiny_model.tts.talker.model(buf.x[:3].clone(), ctx)
        assert torch.allclose(buf.hidden[:3], eager, atol=1e-5)
        assert torch.all(buf.hidden[3] == 7.0)
        for layer, k in enumerate(engine.kv.k):
            changed = (k != before[layer]).flatten(1).any(dim=1).nonzero().flatten().tolist()
            assert changed == [1, 2, 3]  # the 3 real rows' blocks; the padded 4th row wrote nothing
    finally:
        engine.shutdown()


def test_block_table_rows_are_written_only_when_they_grow(tiny_model):
    engine = Engine(tiny_model, EngineConfig(num_kv_blocks=16, max_running=4))
    try:
        buf = engine.runner.buf
        owner = object()
        assert buf.claim(2, owner, 0) and not buf.claim(2, owner, 0)
        buf.write_table(2, [5])
        buf.block_tables.dev[2, 0] = 99  # a rewrite of the unchanged row would undo this
        buf.write_table(2, [5])
        assert buf.block_tables.dev[2, :2].tolist() == [99, 0]
        buf.write_table(2, [5, 6])
        assert buf.block_tables.dev[2, :2].tolist() == [5, 6]
        assert buf.claim(2, owner, 1)  # readmitted after a preemption: the row is written afresh
        buf.write_table(2, [7])
        assert buf.block_tables.dev[2, :2].tolist() == [7, 6]
    finally:
        engine.shutdown()


def test_the_frame_function_makes_no_host_sync(tiny_model, voices_for_graphs):
    """What a CUDA graph of the whole frame (c0 draw, 15 predictor sub-steps with draws, next input) needs:
    no op reads a device value on the host, draws a generator or makes a shape from data. (The talker's
    decode part is checked on CUDA only: its CPU attention reference reads lengths on the host.)"""
    from .test_device_sampling import FailOnHostSync

    requests = mixed_requests(voices_for_graphs, 3)
    for i, r in enumerate(requests):
        r.sampling, r.max_frames = tiny_model.sampling(seed=i), 3
    engine, _ = static_engine(tiny_model, 4)
    try:
        run_all(engine, requests)  # fills the slots' buffers with real hidden states and sampling rows
        decode = engine.runner.decode
        with torch.inference_mode(), FailOnHostSync():
            codes = decode.frame(4)
        assert codes.shape == (4, 17)
    finally:
        engine.shutdown()
