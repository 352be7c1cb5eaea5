"""Engine counters reach /metrics under their documented names, labels included."""

from prometheus_client import generate_latest

from engine.api import EngineStats
from server.metrics import Metrics


def _stats(counters: dict[str, float]) -> EngineStats:
    return EngineStats(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=1, kv_blocks_cached=0,
                       frames_generated=0, counters=counters)


def test_engine_counters_are_exported_with_labels() -> None:
    stats = _stats({"engine_steps": 7, "decode_rows{path=static}": 5, "decode_rows{path=eager}": 2,
                    "undocumented": 1})
    text = generate_latest(Metrics(lambda: stats).registry).decode()
    assert "makima_tts:engine_steps_total 7.0" in text
    assert 'makima_tts:decode_rows_total{path="static"} 5.0' in text
    assert 'makima_tts:decode_rows_total{path="eager"} 2.0' in text
    assert "undocumented" not in text
