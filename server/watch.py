"""Notice an engine that has stopped producing: the liveness half of /health.

The server cannot see inside the engine (its thread may have died on a bug, the device may hang),
but it sees every stream it waits on. If some stream has waited for its next item and no stream
has received anything for ``stall_s``, the engine is stuck: /health turns 503 and an orchestrator
restarts the process (the drain then closes the stuck sessions with 1001 and clients reconnect).
Streams blocked on a slow client are not waiting on the engine and do not count.
"""

from __future__ import annotations

import time


class EngineWatch:
    def __init__(self) -> None:
        self.waiting = 0  # streams awaiting their next item from the engine
        self.last = time.monotonic()  # last item from any stream, or when waiting began

    def wait_begins(self) -> None:
        if self.waiting == 0:  # an idle engine is not a stalled one: the clock starts now
            self.last = time.monotonic()
        self.waiting += 1

    def wait_ends(self, got_item: bool) -> None:
        self.waiting -= 1
        if got_item:
            self.last = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds the engine has owed an item without producing any; 0 when nothing waits."""
        return time.monotonic() - self.last if self.waiting > 0 else 0.0
