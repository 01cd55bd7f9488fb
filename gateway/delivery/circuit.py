"""A small circuit breaker: stop hammering a downstream that keeps failing.

closed → (``threshold`` consecutive failures) → open → (``reset_seconds``) → half_open: one
probe goes out; its success closes the circuit, its failure opens it again.

A failure may carry a *hold*: the downstream's ``Retry-After`` on a 429 or 503 (the worker
caps it).  When that failure opens (or re-opens) the circuit, it stays open for
``max(reset_seconds, hold)``: the management system said when it will take requests again, so
the probe waits for that rather than asking every ``reset_seconds``.  A hold never opens the
circuit by itself — the threshold still decides whether to open — so one odd answer does not
stop the worker; the rows of that request wait on their own ``next_attempt_at``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, threshold: int, reset_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold, self.reset_seconds, self._clock = threshold, reset_seconds, clock
        self._failures = 0
        self._opened_at: float | None = None
        self._open_for = reset_seconds  # this opening's length: reset_seconds or a longer hold
        self._probe_out = False
        self._lock = threading.Lock()
        self.opened_count = 0

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self._open_for:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self) -> bool:
        """May a request go out now?  In half-open, only one probe at a time."""
        with self._lock:
            state = self._state()
            if state is CircuitState.CLOSED:
                return True
            if state is CircuitState.HALF_OPEN and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def seconds_until_probe(self) -> float:
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self._open_for - (self._clock() - self._opened_at))

    def release_probe(self) -> None:
        """A probe slot was taken but nothing was sent: let the next cycle probe."""
        with self._lock:
            self._probe_out = False

    def record_success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probe_out = 0, None, False
            self._open_for = self.reset_seconds

    def record_failure(self, hold: float = 0.0) -> None:
        """A failed request; ``hold`` (seconds, from ``Retry-After``) lengthens an opening."""
        with self._lock:
            self._failures += 1
            state = self._state()
            if state is CircuitState.HALF_OPEN or self._failures >= self.threshold:
                now = self._clock()
                if state is not CircuitState.OPEN:
                    self.opened_count += 1
                # Re-opening while open never shortens a hold already granted.
                left = (self._open_for - (now - self._opened_at)
                        if state is CircuitState.OPEN and self._opened_at is not None else 0.0)
                self._opened_at = now
                self._open_for = max(self.reset_seconds, hold, left)
            self._probe_out = False
