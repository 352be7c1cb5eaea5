"""What OpenAI clients expect around /v1/audio/speech: OpenAI's error body on /v1/ routes only,
GET /v1/models, GET /v1/audio/voices, and audio errors that say what is wrong in words."""

from __future__ import annotations

import pytest

from tests.server.conftest import b64, serve, wav_bytes

VOICES = {"anna": wav_bytes(1.0)}
TEXT = "An OpenAI shaped request."


@pytest.mark.parametrize("method, path, body, headers, status, code, kind", [
    ("post", "/v1/audio/speech", {"model": "x", "input": TEXT, "voice": "nobody"}, {}, 404, "VOICE_NOT_FOUND",
     "invalid_request_error"),
    ("post", "/v1/audio/speech", {"model": "x", "voice": "anna"}, {}, 400, "INVALID_MESSAGE", "invalid_request_error"),
    ("post", "/v1/audio/speech", {"model": "x", "input": TEXT, "voice": "anna"}, {"Authorization": "Bearer no"},
     401, "UNAUTHORIZED", "authentication_error"),
    ("get", "/v1/no-such-route", None, {}, 404, "NOT_FOUND", "invalid_request_error"),
])
async def test_v1_errors_have_openais_shape(method, path, body, headers, status, code, kind):
    tokens = frozenset({"tok"}) if status == 401 else frozenset()  # the guard's refusal is reshaped too
    async with serve(voices=VOICES, auth_tokens=tokens) as client:
        r = await getattr(client, method)(path, json=body, headers=headers)
        assert r.status == status
        err = (await r.json())["error"]
        assert err["code"] == code and err["type"] == kind and err["message"], err
        if status == 401:
            assert r.headers["WWW-Authenticate"] == "Bearer"  # headers survive the reshaping


async def test_other_routes_keep_the_native_error_body():
    async with serve(voices=VOICES) as client:
        r = await client.get("/api/v1/voices/nobody")
        assert r.status == 404 and "error" not in (body := await r.json()) and body["code"] == "VOICE_NOT_FOUND"


async def test_models_and_voices_lists():
    async with serve(voices=VOICES, model_name="random:tiny") as client:
        models = await (await client.get("/v1/models")).json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["random:tiny"]
        voices = await (await client.get("/v1/audio/voices")).json()
        ids = [v["id"] for v in voices["data"]]
        assert ids[0] == "anna" and "alloy" in ids and voices["default"] == "_builtin"
        assert all(v["alias_of"] == "_builtin" for v in voices["data"][1:])


async def test_invalid_audio_says_what_is_wrong_without_an_object_repr():
    async with serve(voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "x_vector_only": True,
                                                         "ref_audio": b64(b"RIFF but not really audio")})
        assert r.status == 400
        err = (await r.json())["error"]
        assert err["code"] == "INVALID_AUDIO" and "Format not recognised" in err["message"], err
        assert "object at 0x" not in err["message"] and "BytesIO" not in err["message"]
