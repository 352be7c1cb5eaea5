"""The routes on CustomVoice models (real engine, tiny random checkpoints): /api/v1/info lists the
speakers and whether the model follows instructions, the WebSocket ``start`` takes a speaker as
``voice`` and an ``instruct``, the OpenAI route takes ``voice`` = speaker and ``instructions``, and
what the model cannot serve gets a coded error naming what it offers."""

from __future__ import annotations

import numpy as np
import pytest

from server.pcm import encode_pcm
from tests.server.conftest import b64, collect_utterance, recv_json, serve, wav_bytes

INSTRUCT = "Speak slowly and warmly."


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.random_checkpoint import make_random_checkpoint

    root = tmp_path_factory.mktemp("cv")
    cfg = EngineConfig(device="cpu", num_kv_blocks=256, deadline_flush=False)
    made = {p: Engine.from_model(make_random_checkpoint(root / p, p, seed=0), cfg)
            for p in ("tiny-custom-voice", "tiny-0.6b-custom-voice")}
    yield made
    for eng in made.values():
        eng.shutdown()


async def engine_audio(engine, text: str, speaker: str, instruct: str | None, frames: int) -> np.ndarray:
    from engine.api import AudioChunk, Request

    req = Request(text=text, speaker=speaker, instruct=instruct, max_frames=frames,
                  sampling=engine.model.sampling(greedy=True))
    return np.concatenate([c.samples async for c in engine.submit(req) if isinstance(c, AudioChunk)])


@pytest.mark.timeout(60)
async def test_info_lists_speakers_and_instructions(engines):
    for preset, instructions in (("tiny-custom-voice", True), ("tiny-0.6b-custom-voice", False)):
        async with serve(engines[preset]) as client:
            info = await (await client.get("/api/v1/info")).json()
        assert info["model_type"] == "custom_voice" and info["speakers"] == ["dylan", "eric", "ryan", "vivian"]
        assert info["instructions"] is instructions and info["voice_cloning"] is False
    async with serve() as client:  # the fake engine plays a Base model
        info = await (await client.get("/api/v1/info")).json()
    assert (info["model_type"], info["speakers"], info["instructions"], info["voice_cloning"]) == (
        "base", [], False, True)


@pytest.mark.timeout(120)
async def test_websocket_speaker_and_instruction_equal_the_engine(engines):
    engine = engines["tiny-custom-voice"]
    async with serve(engine) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "Ryan", "instruct": INSTRUCT, "encoding": "pcm_f32le",
                            "sampling": {"greedy": True}, "max_frames": 6})
        ready = await recv_json(ws, timeout=60)
        assert ready["type"] == "ready" and ready["voice"] == "ryan", ready
        await ws.send_json({"type": "speak", "id": "a", "text": "Hello there."})
        audio, done, _ = await collect_utterance(ws, timeout=60)
        assert done["type"] == "complete", done
    got = np.frombuffer(audio, "<f4")
    np.testing.assert_array_equal(got, await engine_audio(engine, "Hello there.", "ryan", INSTRUCT, 6))
    # The instruction reaches the model: without it the same speaker says something else.
    assert not np.array_equal(got, await engine_audio(engine, "Hello there.", "ryan", None, 6))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("voice, code, named", [
    ("bob", "VOICE_NOT_FOUND", "dylan, eric, ryan, vivian"),
    (None, "VOICE_NOT_FOUND", "choose a speaker"),
    ({"ref_audio": b64(wav_bytes(1.0)), "x_vector_only": True}, "UNSUPPORTED", "clones no voice"),
])
async def test_websocket_start_refusals_name_the_speakers(engines, voice, code, named):
    async with serve(engines["tiny-custom-voice"]) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", **({"voice": voice} if voice is not None else {})})
        msg = await recv_json(ws, timeout=30)
    assert msg["type"] == "error" and msg["code"] == code and named in msg["message"], msg


@pytest.mark.timeout(180)
async def test_openai_voice_is_a_speaker_and_instructions_apply(engines):
    from engine.api import AudioChunk, Request

    engine = engines["tiny-custom-voice"]
    async with serve(engine) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": "Hi.", "voice": "Eric", "seed": 3,
                                                         "instructions": INSTRUCT, "response_format": "pcm"})
        assert r.status == 200, await r.text()
        body = await r.read()
    req = Request(text="Hi.", speaker="eric", instruct=INSTRUCT, sampling=engine.model.sampling_from_options(seed=3))
    want = np.concatenate([c.samples async for c in engine.submit(req) if isinstance(c, AudioChunk)])
    assert body == encode_pcm(want, "pcm_s16le")
    async with serve(engines["tiny-0.6b-custom-voice"]) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": "Hello.", "voice": "ryan",
                                                         "instructions": INSTRUCT})
        err = await r.json()
    assert r.status == 400 and err["code"] == "UNSUPPORTED" and "0.6B" in err["message"], err


@pytest.mark.timeout(60)
async def test_openai_names_and_no_name_mean_the_default_speaker(engines):
    for voice in ("alloy", None):
        async with serve(engines["tiny-custom-voice"], default_voice="vivian") as client:
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", **({"voice": voice} if voice else {})})
            ready = await recv_json(ws, timeout=30)
        assert ready["type"] == "ready" and ready["voice"] == "vivian", ready
    async with serve(engines["tiny-custom-voice"]) as client:  # no default: the name is reported as asked
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "alloy"})
        msg = await recv_json(ws, timeout=30)
    assert msg["code"] == "VOICE_NOT_FOUND" and "'alloy'" in msg["message"], msg
