"""Progress of a step that walks the training items: items done of total, item-draws per second, ETA."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    """Logs at INFO every 10% of the items or every 30 s, whichever comes first, and once at the end."""

    def __init__(self, log: Any, what: str, items: int, draws: int, fraction: float = 0.1, seconds: float = 30.0):
        self.log, self.what, self.items, self.draws = log, what, items, draws
        self.fraction, self.seconds = fraction, seconds
        self.done = 0
        self.start = self._last_time = time.perf_counter()
        self._last_done = 0

    def rate(self) -> float:
        """Item-draws per second so far."""
        return round(self.done * self.draws / max(time.perf_counter() - self.start, 1e-9), 1)

    def advance(self, n: int) -> None:
        """Count `n` more items; log when due."""
        self.done += n
        now = time.perf_counter()
        due = (self.done - self._last_done) >= self.fraction * max(
            self.items, 1
        ) or now - self._last_time >= self.seconds
        if due or self.done >= self.items:
            rate = self.rate()
            left = max(self.items - self.done, 0) * self.draws / rate if rate > 0 else 0.0
            self.log.info(
                f"{self.what}: {self.done}/{self.items} items, {rate:.0f} item-draws/s, "
                + (f"ETA {left:.0f}s" if self.done < self.items else f"done in {now - self.start:.1f}s")
            )
            self._last_done, self._last_time = self.done, now
