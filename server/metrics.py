"""Prometheus metrics, named in vLLM's style (``makima_tts:`` prefix, ``_seconds``/``_total``).

Each app owns its registry (tests build many apps in one process). Engine-side numbers (running
and waiting requests, KV blocks, frames) are read from ``engine.stats()`` at scrape time by a
collector, so they are never stale and cost nothing between scrapes. Labels stay bounded: error
code and outcome only, never voice, session or user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.api import COUNTER_HELP, EngineStats

# No "*_created" series beside every counter and histogram: process-wide, and nothing here reads them.
disable_created_metrics()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "makima_tts:"
# vLLM's TTFT buckets, cut at 80 s: TTS first audio beyond that is a failure anyway.
TTFA_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        if s is None:  # model not loaded yet
            return
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Engine requests being decoded.", s.running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Engine requests waiting to be scheduled.", s.waiting)
        yield GaugeMetricFamily(PREFIX + "kv_blocks_used", "Paged KV blocks in use.", s.kv_blocks_used)
        # A gauge: "_total" would read as a counter to Prometheus tooling (rate() over it is meaningless).
        yield GaugeMetricFamily(PREFIX + "kv_blocks_capacity", "Paged KV blocks in the pool.", s.kv_blocks_total)
        yield GaugeMetricFamily(PREFIX + "kv_blocks_cached", "Free KV blocks holding reusable prefixes.",
                                s.kv_blocks_cached)
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).",
                                s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield CounterMetricFamily(PREFIX + "frames_generated", "Codec frames (80 ms each) generated.",
                                  s.frames_generated)
        yield from _engine_counters(s.counters)


def _engine_counters(counters: dict[str, float]) -> Iterator[Metric]:
    """``EngineStats.counters`` as Prometheus counters; ``name{label=value}`` keys become labelled samples."""
    families: dict[str, CounterMetricFamily] = {}
    for key, value in sorted(counters.items()):
        name, _, label = key.partition("{")
        if name not in COUNTER_HELP:
            continue  # only documented counters are exported
        label_name, _, label_value = label.rstrip("}").partition("=")
        family = families.get(name)
        if family is None:
            family = families[name] = CounterMetricFamily(PREFIX + name, COUNTER_HELP[name],
                                                          labels=[label_name] if label_name else None)
        family.add_metric([label_value] if label_name else [], value)
    yield from families.values()


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        r = self.registry = CollectorRegistry()
        self.ttfa = Histogram(PREFIX + "time_to_first_audio_seconds",
                              "From an utterance's arrival to its first audio sent.", registry=r, buckets=TTFA_BUCKETS)
        self.rtf = Histogram(PREFIX + "real_time_factor", "Wall time / audio time per finished utterance "
                             "(lower is faster; < 1 is faster than real time).", registry=r, buckets=RTF_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From an utterance's arrival to its end.",
                             registry=r, buckets=E2E_BUCKETS)
        self.sessions = Gauge(PREFIX + "num_sessions", "Open WebSocket sessions and HTTP speech requests.",
                              registry=r)
        self.requests = Counter(PREFIX + "requests", "Finished utterances by outcome.", ["outcome"], registry=r)
        self.errors = Counter(PREFIX + "errors", "Errors sent to clients, by code.", ["code"], registry=r)
        self.audio_seconds = Counter(PREFIX + "audio_seconds", "Audio sent to clients, seconds.", registry=r)
        self.input_chars = Counter(PREFIX + "input_characters", "Characters of text accepted.", registry=r)
        self.ready = Gauge(PREFIX + "ready", "1 when the model is loaded and the server not draining.", registry=r)
        r.register(_EngineCollector(stats))
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds, ...

    def render(self) -> bytes:
        return generate_latest(self.registry)
