"""Section timers of the round benchmark (``fedprompt bench``): wall-clock seconds per named part of a round.

The engine installs a :class:`SectionTimer` on the client module it trains (``client.timer``) and the base client
opens a section around each of the method's parts (text, image, logits); outside the benchmark every timer is a
:class:`NoTimer`. Method code never names a timer.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext


class SectionTimer:
    """Wall-clock seconds per named section (data, image, text, logits, backward, optimizer, ...).

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called at both ends of every section so that asynchronous device
    work is charged to the section that launched it; the round benchmark uses it, training does not (no timer).
    """

    def __init__(self, sync=None):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        if self.sync:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def pop(self) -> dict[str, float]:
        """The seconds so far, and start again."""
        out, self.seconds = self.seconds, {}
        return out


class NoTimer:
    """A timer that records nothing (the default outside the round benchmark)."""

    def section(self, name: str):
        return nullcontext()

    def add(self, name: str, seconds: float) -> None:
        pass
