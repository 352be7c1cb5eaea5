"""Issue #13 item 1 through the server over the real engine (tiny random checkpoint): a seed out of
the shared range is a coded 400 on the OpenAI route and a coded error on the WebSocket, the same on
both, and the slot and KV blocks it would have leaked are back to 0."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.config import EngineConfig
from engine.engine import Engine
from server.app import create_app
from server.settings import ServerSettings
from server.state import STATE
from tests.server.conftest import b64, recv_json, wav_bytes

BAD_SEEDS = [2**64, -2**63 - 1, 2**63, -1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)
    eng = Engine.from_model(Path(path), EngineConfig(device="cpu", num_kv_blocks=128))
    yield eng
    eng.shutdown()


def body(seed) -> dict:
    return {"input": "Hello there.", "response_format": "pcm", "seed": seed,
            "ref_audio": b64(wav_bytes(1.0, sr=24000)), "x_vector_only": True}


async def assert_idle(client, engine) -> None:
    state = client.server.app[STATE]
    for _ in range(100):  # a cancelled request frees its blocks within one engine step
        stats = engine.stats()
        if state.active == 0 and stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still held: active={state.active} {engine.stats()}")


async def test_out_of_range_seeds_are_refused_alike_by_both_routes_and_leak_nothing(engine):
    client = TestClient(TestServer(create_app(engine, ServerSettings(max_sessions=2)), host="127.0.0.1"))
    await client.start_server()
    try:
        for seed in BAD_SEEDS:
            resp = await asyncio.wait_for(client.post("/v1/audio/speech", json=body(seed)), 20)
            assert resp.status == 400, (seed, resp.status)
            assert (await resp.json())["code"] == "INVALID_MESSAGE"
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", "voice": {"ref_audio": body(seed)["ref_audio"], "x_vector_only": True},
                                "sampling": {"seed": seed}})
            msg = await recv_json(ws)
            assert (msg["type"], msg["code"]) == ("error", "INVALID_MESSAGE"), (seed, msg)
            await ws.close()
        await assert_idle(client, engine)
        # max_sessions=2: had any of the refused requests kept its slot, this would be OVERLOADED.
        for _ in range(3):
            resp = await asyncio.wait_for(client.post("/v1/audio/speech", json=body(2**63 - 1)), 60)
            assert resp.status == 200 and len(await resp.read()) > 0
        await assert_idle(client, engine)
    finally:
        await client.close()
