"""Per-token limits: concurrent sessions (sockets and HTTP speech requests together) and message
rate (a token bucket shared by the token's sessions, or per connection without auth)."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.server.conftest import collect_utterance, recv_json, serve, wav_bytes

VOICES = {"anna": wav_bytes(1.0, freq=200.0)}
TOKENS = frozenset({"alpha", "beta"})


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def open_session(client, token: str | None = None, browser: bool = False):
    if browser:  # browsers send the token as a subprotocol
        ws = await client.ws_connect("/api/v1/speak", protocols=("makima-tts.v1", f"bearer.{token}"))
    else:
        ws = await client.ws_connect("/api/v1/speak", headers=bearer(token) if token else None)
    await ws.send_json({"type": "start", "voice": "anna"})
    return ws, await recv_json(ws)


async def test_a_token_holds_at_most_its_sessions_and_others_are_unaffected(report):
    async with serve(voices=VOICES, auth_tokens=TOKENS, max_sessions_per_token=2) as client:
        (a1, r1), (a2, r2) = await open_session(client, "alpha"), await open_session(client, "alpha", browser=True)
        assert r1["type"] == r2["type"] == "ready"
        a3, refused = await open_session(client, "alpha")  # a session is counted from its start
        closed = await a3.receive(timeout=5)
        http = await client.post("/v1/audio/speech", headers=bearer("alpha"),
                                 json={"input": "Hi.", "voice": "anna", "response_format": "pcm"})
        b1, rb = await open_session(client, "beta")  # another token is not affected
        await a1.close()
        await asyncio.sleep(0.05)
        a4, r4 = await open_session(client, "alpha")  # a slot freed is a slot to take
        for ws in (a2, a4, b1):
            await ws.close()
        report.update({"per_token_cap": 2, "third_session": refused["code"], "third_close": closed.data,
                       "http_while_full": http.status})
        assert refused["code"] == "RATE_LIMITED" and closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1013
        assert http.status == 429 and (await http.json())["code"] == "RATE_LIMITED"
        assert rb["type"] == "ready" and r4["type"] == "ready"


async def test_a_flood_is_refused_then_closed_and_a_steady_client_never_is(report):
    async with serve(voices=VOICES, auth_tokens=TOKENS, max_messages_per_s=20, message_burst=5) as client:
        steady, _ = await open_session(client, "beta")  # handshake + start: 2 of beta's 5
        for _ in range(8):  # 8 messages at 10/s, under 20/s: never refused
            await steady.send_json({"type": "flush"})
            await asyncio.sleep(0.1)
        await steady.send_json({"type": "speak", "id": 1, "text": "Still welcome."})
        _, done, others = await collect_utterance(steady)
        flood, _ = await open_session(client, "alpha")
        for _ in range(40):
            await flood.send_json({"type": "flush"})  # accepted flushes answer nothing; refusals do
        codes, close = [], None
        while close is None:
            msg = await flood.receive(timeout=5)
            if msg.type == aiohttp.WSMsgType.TEXT:
                codes.append(msg.json()["code"])
            else:
                close = msg
        http = [(await client.get("/api/v1/voices", headers=bearer("alpha"))).status for _ in range(10)]
        await steady.close()
        report.update({"rate_per_s": 20, "burst": 5, "flood_sent": 40, "refused_before_close": len(codes),
                       "flood_close": close.data, "steady_refused": len(others)})
        assert done["type"] == "complete" and not others
        assert codes == ["RATE_LIMITED"] * 5 and close.type == aiohttp.WSMsgType.CLOSE and close.data == 1008
        assert 429 in http  # the token's HTTP requests draw from the same bucket


async def test_without_auth_each_connection_has_its_own_bucket():
    async with serve(voices=VOICES, max_messages_per_s=1, message_burst=3) as client:
        one, r1 = await open_session(client)
        two, r2 = await open_session(client)  # a second connection is not charged for the first's start
        await one.send_json({"type": "flush"})
        await two.send_json({"type": "flush"})
        await one.send_json({"type": "speak", "id": 1, "text": "Third message of one."})
        await two.send_json({"type": "speak", "id": 2, "text": "Third message of two."})
        for ws in (one, two):
            _, done, _ = await collect_utterance(ws)
            assert done["type"] == "complete"
            await ws.close()
        assert r1["type"] == r2["type"] == "ready"
