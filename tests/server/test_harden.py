"""Issue #13 through the real server (fake engine): each bad input a hostile client sent gets a coded
answer, never a 500, a silent close or a held slot."""

from __future__ import annotations

import pytest

from tests.server.conftest import recv_json, serve, wav_bytes

VOICES = {"anna": wav_bytes(1.0)}
HUGE = "1" + "0" * 400  # a JSON integer no float can hold


# ---- item 2: one numeric parser that cannot raise -----------------------------------------------
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
async def test_a_huge_integer_in_a_float_field_is_a_coded_error_and_the_session_lives(field):
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_str(f'{{"type": "start", "voice": "anna", "sampling": {{"{field}": {HUGE}}}}}')
        err = await recv_json(ws)
        assert (err["type"], err["code"]) == ("error", "INVALID_MESSAGE"), err
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"
        await ws.close()

