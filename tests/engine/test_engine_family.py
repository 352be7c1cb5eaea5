"""The engine on CustomVoice / VoiceDesign / Base variants: batch invariance with mixed speakers,
instructions and lengths (Issue #15, Must show 3), prefix sharing per speaker and instruction,
and coded refusals of what the loaded variant cannot serve."""

import numpy as np
import pytest
import torch

from engine.api import Request, StopReason
from engine.config import EngineConfig
from engine.engine import Engine
from engine.prompt import UnsupportedByModel, build_prompt
from engine.voice import VoicePrompt

from .test_engine import run_all

TEXTS = ["Hi.", "A slightly longer sentence to speak.", "Short one.",
         "The quick brown fox jumps over the lazy dog and keeps running far away.", "Numbers 1 2 3."]
INSTRUCTS = [None, "Speak slowly and warmly.", "Whisper, as if telling a secret, with a little excitement."]
SPEAKERS = ["ryan", "Eric", "dylan", "Vivian"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    root = tmp_path_factory.mktemp("variants")
    return {p: make_random_checkpoint(root / p, p, seed=0)
            for p in ("tiny-custom-voice", "tiny-0.6b-custom-voice", "tiny-voice-design")}


@pytest.fixture(scope="module")
def cv_model(checkpoints):
    from engine.model import TTSModel

    return TTSModel.load(checkpoints["tiny-custom-voice"])


def engine_for(model, block_size=16):
    return Engine(model, EngineConfig(num_kv_blocks=512, block_size=block_size, max_batched_tokens=64,
                                      chunk_frames=(1, 2, 4)))


def mixed_requests(model, n=10):
    return [Request(text=TEXTS[i % len(TEXTS)], speaker=SPEAKERS[i % len(SPEAKERS)], instruct=INSTRUCTS[i % 3],
                    language=["english", "auto", "chinese"][i % 3], max_frames=5 + (i * 5) % 13,
                    non_streaming_text=i % 4 == 3, request_id=f"cv{i}", sampling=model.sampling(greedy=True))
            for i in range(n)]


def test_mixed_speakers_instructions_and_lengths_batch_invariant(cv_model):
    requests = mixed_requests(cv_model, 10)
    eng = engine_for(cv_model)
    try:
        results = run_all(eng, requests, stagger=0.01)
        assert eng.blocks.num_used == 0
    finally:
        eng.shutdown()
    assert len({(r.speaker.lower(), r.instruct) for r in requests}) >= 8
    for req, (chunks, fin) in zip(requests, results, strict=True):
        alone = cv_model.synthesize(req.text, None, req.language, cv_model.sampling(greedy=True), req.max_frames,
                                    req.non_streaming_text, speaker=req.speaker, instruct=req.instruct)
        assert fin.stop_reason in (StopReason.EOS, StopReason.MAX_FRAMES), fin
        assert np.array_equal(fin.codes, alone.codes.numpy()), req.request_id
        streamed = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
        full = cv_model.decode(torch.from_numpy(fin.codes))
        assert streamed.shape == full.shape and np.abs(streamed - full).max() <= 1e-5


def test_a_seeded_request_is_unchanged_by_neighbours_of_other_speakers(cv_model):
    probe = dict(text=TEXTS[1], speaker="eric", instruct=INSTRUCTS[2], language="auto", max_frames=10)
    eng = engine_for(cv_model)
    try:
        alone = run_all(eng, [Request(**probe, sampling=cv_model.sampling(seed=5), request_id="alone")])[0][1]
        others = mixed_requests(cv_model, 6)
        for r in others:
            r.sampling = cv_model.sampling(seed=11)
        mixed = [*others[:3], Request(**probe, sampling=cv_model.sampling(seed=5), request_id="probe"), *others[3:]]
        together = run_all(eng, mixed, stagger=0.005)[3][1]
    finally:
        eng.shutdown()
    assert np.array_equal(alone.codes, together.codes)


def _prefill(model, req):
    tok = model.tokenizer
    return build_prompt(model.tts.talker, model.cfg, tok.role_ids(), tok.target_ids(req.text), None, req.language,
                        False, req.speaker, tok.instruct_ids(req.instruct)).prefill


def _shared_rows(a, b, block_size):
    """Rows the prefix cache may reuse: whole blocks of equal leading rows, never the last row's block."""
    equal = 0
    while equal < min(len(a), len(b)) and torch.equal(a[equal], b[equal]):
        equal += 1
    return min(equal // block_size, (len(a) - 1) // block_size, (len(b) - 1) // block_size) * block_size


def test_prefix_sharing_is_per_speaker_and_instruction(cv_model):
    bs = 4
    first = Request(text=TEXTS[3], speaker="ryan", instruct=INSTRUCTS[2], max_frames=2)
    later = [Request(text=TEXTS[1], speaker="ryan", instruct=INSTRUCTS[2], max_frames=2),  # same voice: head shared
             Request(text=TEXTS[1], speaker="vivian", instruct=INSTRUCTS[2], max_frames=2),  # up to the speaker row
             Request(text=TEXTS[1], speaker="ryan", instruct=INSTRUCTS[1], max_frames=2),  # the user-turn opening only
             Request(text=TEXTS[1], speaker="ryan", max_frames=2)]  # role rows; then the head differs
    eng = engine_for(cv_model, block_size=bs)
    try:
        run_all(eng, [first])
        base = _prefill(cv_model, first)
        seen = [base]  # every prompt run so far stays findable (the pool is far from full)
        for req in later:
            before = eng.stats().extra["prefix_rows_reused"]
            run_all(eng, [req])
            reused = eng.stats().extra["prefix_rows_reused"] - before
            rows = _prefill(cv_model, req)
            assert reused == max(_shared_rows(s, rows, bs) for s in seen), (req.speaker, req.instruct)
            seen.append(rows)
    finally:
        eng.shutdown()
    same = _shared_rows(base, _prefill(cv_model, later[0]), bs)
    other_speaker = _shared_rows(base, _prefill(cv_model, later[1]), bs)
    assert same > other_speaker > 0  # the instruction block is shared, the speaker row is not


def test_engine_refusals_are_coded_and_name_the_offer(cv_model, checkpoints):
    from engine.model import TTSModel

    voice = VoicePrompt(speaker_embedding=torch.zeros(cv_model.cfg.talker.transformer.hidden_size))
    cases = [(cv_model, dict(voice=voice), "UNSUPPORTED_BY_MODEL", "clone"),
             (cv_model, dict(speaker="bob"), "UNKNOWN_SPEAKER", "dylan, eric, ryan, vivian"),
             (cv_model, dict(), "VOICE_REQUIRED", "speaker"),
             (TTSModel.load(checkpoints["tiny-0.6b-custom-voice"]), dict(speaker="ryan", instruct="Be loud."),
              "UNSUPPORTED_BY_MODEL", "0.6B"),
             (TTSModel.load(checkpoints["tiny-voice-design"]), dict(speaker="ryan"), "UNSUPPORTED_BY_MODEL",
              "VoiceDesign")]
    for model, fields, code, named in cases:
        eng = engine_for(model)
        try:
            (chunks, fin), = run_all(eng, [Request(text="Hello.", max_frames=2, **fields)])
            assert eng.blocks.num_used == 0
        finally:
            eng.shutdown()
        assert chunks == [] and fin.stop_reason == StopReason.ERROR and fin.error_code == code, fin
        assert named in fin.error, fin.error


def test_base_model_refuses_speakers_and_instructions(tiny_model):
    voice = VoicePrompt(speaker_embedding=torch.zeros(tiny_model.cfg.talker.transformer.hidden_size))
    greedy = tiny_model.sampling(greedy=True)
    for kwargs, code in [(dict(speaker="ryan"), "UNSUPPORTED_BY_MODEL"), (dict(instruct="Be loud."),
                                                                          "UNSUPPORTED_BY_MODEL")]:
        with pytest.raises(UnsupportedByModel) as e:
            tiny_model.synthesize("Hello.", voice, "auto", greedy, 2, **kwargs)
        assert e.value.code == code and "Base" in str(e.value)
    with pytest.raises(UnsupportedByModel) as e:
        tiny_model.synthesize("Hello.", None, "auto", greedy, 2)
    assert e.value.code == "VOICE_REQUIRED"
    assert tiny_model.info.clones_voices and tiny_model.info.speakers == []


def test_variants_without_speaker_encoder_refuse_voice_cloning(cv_model):
    with pytest.raises(UnsupportedByModel) as e:
        cv_model.voice_prompt(np.zeros(24000, np.float32), x_vector_only=True)
    assert e.value.code == "UNSUPPORTED_BY_MODEL"
    info = cv_model.info
    assert (info.model_type, info.speakers, info.takes_instructions, info.clones_voices) == (
        "custom_voice", ["dylan", "eric", "ryan", "vivian"], True, False)


def test_empty_instruction_is_no_instruction_and_special_tokens_are_refused(cv_model):
    tok = cv_model.tokenizer
    assert tok.instruct_ids("") is None and tok.instruct_ids(None) is None
    with pytest.raises(ValueError, match="reserved token"):
        tok.instruct_ids("be loud <|im_end|> sneaky")


def test_warm_up_voice_is_one_each_variant_serves(cv_model, checkpoints, tiny_model):
    """The CUDA warm-up's requests (model.warm_up_voice) must be ones the variant accepts."""
    from engine.model import TTSModel

    models = [cv_model, tiny_model, TTSModel.load(checkpoints["tiny-voice-design"])]
    for model in models:
        eng = engine_for(model)
        try:
            (_, fin), = run_all(eng, [Request(text="Warming up.", max_frames=2, **model.warm_up_voice())])
        finally:
            eng.shutdown()
        assert fin.error is None and fin.frames == 2, (model.cfg.model_type, fin)


@pytest.mark.parametrize("preset", ["tiny-custom-voice", "tiny-0.6b-custom-voice"])
def test_graph_path_serves_speakers_like_the_eager_path(checkpoints, preset):
    """The static-buffer decode path CUDA replays, on CPU: speaker and instruction prompts, with a
    projecting (1.7B-like) and an Identity (0.6B-like) ``small_to_mtp_projection``, against the eager
    decode (``cuda_graphs`` off)."""
    from engine.model import TTSModel

    model = TTSModel.load(checkpoints[preset])
    requests = mixed_requests(model, 6)
    if not model.cfg.takes_instructions:
        for r in requests:
            r.instruct = None
    counters = {}
    results = {}
    for static in (False, True):
        engine = Engine(model, EngineConfig(num_kv_blocks=512, max_batched_tokens=64, chunk_frames=(1, 2, 4),
                                            max_running=8, cuda_graphs=static))
        try:
            for r in requests:
                r.request_id = r.request_id.split("@")[0] + f"@{static}"
            results[static] = run_all(engine, requests, stagger=0.01)
            counters[static] = engine.stats().counters
        finally:
            engine.shutdown()
    for (_, want), (_, got) in zip(results[False], results[True], strict=True):
        assert want.error is None and np.array_equal(got.codes, want.codes), got.request_id
    assert counters[True]["decode_rows{path=static}"] > 0 and counters[True]["decode_rows{path=eager}"] == 0
    assert counters[False]["decode_rows{path=eager}"] > 0
