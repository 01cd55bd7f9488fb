"""A small circuit breaker: stop hammering a downstream that keeps failing.

closed → (``threshold`` consecutive failures) → open → (``reset_seconds``) → half_open: one
probe goes out; its success closes the circuit, its failure opens it again.
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
        if self._clock() - self._opened_at >= self.reset_seconds:
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
            return max(0.0, self.reset_seconds - (self._clock() - self._opened_at))

    def release_probe(self) -> None:
        """A probe slot was taken but nothing was sent: let the next cycle probe."""
        with self._lock:
            self._probe_out = False

    def record_success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probe_out = 0, None, False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            half_open = self._state() is CircuitState.HALF_OPEN
            if half_open or self._failures >= self.threshold:
                if self._opened_at is None or half_open:
                    self.opened_count += 1
                self._opened_at = self._clock()
            self._probe_out = False
