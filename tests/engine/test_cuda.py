"""The engine on CUDA: the Triton kernels in the real model path, against the CPU path and the oracle.

Skipped without a GPU (CI has none); `bench/gpu_check.sh` runs this file when a GPU is lent. In fp32 the
GPU must reproduce the oracle's greedy codes, since the kernels compute in fp32 and cuBLAS does not use
TF32 unless asked; in bf16 (the GPU default) codes may differ, so bf16 is held to the fp32 logits.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.api import StopReason
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model import TTSModel
from engine.voice import VoicePrompt

from .helpers import FIXTURES
from .test_engine import greedy, mixed_requests, run_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_fp32(tiny_checkpoint):
    return TTSModel.load(tiny_checkpoint, device="cuda", dtype=torch.float32)


@pytest.fixture(scope="module")
def cuda_bf16(tiny_checkpoint):
    return TTSModel.load(tiny_checkpoint, device="cuda")


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(FIXTURES / "e2e_tiny.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cases"]), f.metadata()["ref_text"]


def _voice(tensors, model, mode, ref_text) -> VoicePrompt:
    if mode == "xvec":
        return VoicePrompt(speaker_embedding=tensors["speaker_embedding"])
    return VoicePrompt(speaker_embedding=tensors["speaker_embedding"], ref_codes=tensors["ref_codes"],
                       ref_text_ids=model.tokenizer.ref_ids(ref_text))


def test_default_dtype_on_cuda_is_bfloat16(cuda_bf16):
    assert cuda_bf16.dtype == torch.bfloat16
    assert cuda_bf16.tts.talker.codec_head.weight.dtype == torch.bfloat16


def test_fp32_greedy_codes_equal_the_oracle(cuda_fp32, golden):
    tensors, cases, ref_text = golden
    for name, case in cases.items():
        voice = _voice(tensors, cuda_fp32, case["mode"], ref_text)
        out = cuda_fp32.synthesize(case["text"], voice, case["language"], cuda_fp32.sampling(greedy=True),
                                   max_frames=case["frames"], non_streaming_text=case["non_streaming_text"])
        assert torch.equal(out.codes.cpu(), tensors[f"{name}.codes"]), name
        if f"{name}.wave" in tensors:
            assert np.abs(out.audio - tensors[f"{name}.wave"].numpy()).max() <= 1e-4, name


def test_voice_prompt_on_cuda_matches_the_oracle(cuda_fp32, golden):
    tensors, _, ref_text = golden
    voice = cuda_fp32.voice_prompt(tensors["ref_wave"].numpy(), ref_text)
    assert (voice.speaker_embedding.cpu() - tensors["speaker_embedding"]).abs().max() <= 1e-4
    assert torch.equal(voice.ref_codes, tensors["ref_codes"])


def test_bf16_logits_track_fp32(cuda_fp32, cuda_bf16, golden):
    from engine.generate import Trace, generate_codes
    from engine.prompt import build_prompt

    tensors, cases, ref_text = golden
    case = cases["icl_english_stream_short"]
    logits = []
    for model in (cuda_fp32, cuda_bf16):
        voice = _voice(tensors, model, "icl", ref_text)
        prompt = build_prompt(model.tts.talker, model.cfg, model.tokenizer.role_ids(),
                              model.tokenizer.target_ids(case["text"]), voice, "english", False)
        trace = Trace()
        with torch.inference_mode():
            generate_codes(model.tts.talker, prompt, model.sampling(greedy=True), 1, trace)
        logits.append(trace.talker_logits[0].float().cpu())
    fp32, bf16 = logits
    assert torch.isfinite(bf16).all()
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=0).item()
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("dtype_fixture", ["cuda_fp32", "cuda_bf16"])
def test_engine_on_cuda_batches_streams_and_frees(request, dtype_fixture):
    model = request.getfixturevalue(dtype_fixture)
    t = np.arange(36000) / 24000
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 1.5 * t)).astype(np.float32)
    voices = {"icl": model.voice_prompt(wave, "Reference one."), "xvec": model.voice_prompt(wave, x_vector_only=True)}
    engine = Engine(model, EngineConfig(device="cuda", num_kv_blocks=256, max_batched_tokens=64,
                                        chunk_frames=(1, 2, 4)))
    try:
        requests = mixed_requests(voices, 10)
        for r in requests:
            r.sampling = greedy(model)
        results = run_all(engine, requests, stagger=0.01)
        for req, (chunks, fin) in zip(requests, results, strict=True):
            assert fin.stop_reason in (StopReason.EOS, StopReason.MAX_FRAMES), fin
            streamed = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
            assert streamed.shape == (1920 * fin.frames,)
            full = model.decode(torch.from_numpy(fin.codes), req.voice)
            assert np.abs(streamed - full).max() <= 1e-4, req.request_id
            if model.dtype == torch.float32:  # bf16 GEMMs of other batch sizes may round differently
                alone = model.synthesize(req.text, req.voice, req.language, greedy(model), req.max_frames,
                                         req.non_streaming_text)
                assert np.array_equal(fin.codes, alone.codes.cpu().numpy()), req.request_id
        assert engine.blocks.num_used == 0
    finally:
        engine.shutdown()
