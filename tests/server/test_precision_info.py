"""/api/v1/info says which weight format the engine chose and why (engine/precision.py), and the
serve/synthesize flags reach the engine."""

from __future__ import annotations

import argparse

import pytest
from aiohttp.test_utils import TestClient, TestServer

from server import cli
from server.app import create_app
from server.settings import ServerSettings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


async def test_info_reports_the_engine_precision(tiny):
    from server.loader import load_engine

    engine = load_engine(str(tiny), "cpu", lambda _: None, 1, "int8")
    try:
        client = TestClient(TestServer(create_app(engine, ServerSettings()), host="127.0.0.1"))
        await client.start_server()
        try:
            info = await (await client.get("/api/v1/info")).json()
        finally:
            await client.close()
    finally:
        engine.shutdown()
    p = info["precision"]
    assert p["weights"] == "int8" and p["reason"] == "requested --weights int8" and p["dtype"] == "float32"
    assert p["cpu_threads"] == 1 and p["isa"] in ("avx2", "avx512", "avx512_bf16", "amx")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    cli._add_serve(sub)
    cli._add_synthesize(sub)
    return parser


def test_serve_and_synthesize_take_weights_dtype_and_threads():
    parser = _parser()
    serve = parser.parse_args(["serve", "--weights", "bf16", "--dtype", "float32", "--threads", "2"])
    assert (serve.weights, serve.dtype, serve.threads) == ("bf16", "float32", 2)
    assert parser.parse_args(["serve"]).weights == "auto"
    synth = parser.parse_args(["synthesize", "--weights", "int8"])
    assert synth.weights == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--weights", "int4"])
