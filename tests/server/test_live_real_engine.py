"""A live utterance through the server over the real engine (tiny checkpoint, greedy): appended word by
word, mid-word and with pauses, it gives bitwise the audio of the same text sent as one speak."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.server.conftest import collect_utterance, recv_json
from tests.server.test_real_engine import client_for, engine, start_msg, tiny  # noqa: F401 (fixtures)

TEXT = "A second, somewhat longer sentence to speak."


async def utterance(client, ref, icl: bool, pieces: list[str] | None) -> np.ndarray:
    ws = await client.ws_connect("/api/v1/speak")
    await ws.send_json(start_msg(ref, icl, max_frames=40, language="english" if icl else "auto"))
    assert (await recv_json(ws, timeout=60))["type"] == "ready"
    if pieces is None:
        await ws.send_json({"type": "speak", "id": "u", "text": TEXT})
    else:
        await ws.send_json({"type": "speak", "id": "u", "live": True})
        for i, piece in enumerate(pieces):
            await ws.send_json({"type": "append", "text": piece})
            await asyncio.sleep(0.2 if i % 3 == 2 else 0.0)  # a pause of several frames now and then
        await ws.send_json({"type": "end"})
    audio, done, others = await collect_utterance(ws, timeout=120)
    assert done["type"] == "complete" and not others, (done, others)
    await ws.close()
    return np.frombuffer(audio, "<f4")


@pytest.mark.parametrize("icl", [False, True], ids=["x_vector", "icl"])
@pytest.mark.timeout(300)
async def test_live_appends_equal_one_speak_bitwise(tiny, engine, icl):  # noqa: F811
    client = await client_for(engine)
    try:
        whole = await utterance(client, tiny[1], icl, None)
        words = [w + " " for w in TEXT.split(" ")[:-1]] + [TEXT.split(" ")[-1]]
        mid = [TEXT[i:i + 5] for i in range(0, len(TEXT), 5)]
        for pieces in (words, mid):
            np.testing.assert_array_equal(await utterance(client, tiny[1], icl, pieces), whole)
    finally:
        await client.close()
