"""A background loop's run of failed cycles (the store down, a network blip), logged once.

The delivery worker and the batch processor go round every fraction of a second; while the
store is unreachable each cycle fails.  Logging each failure with its traceback filled the log
with hundreds a minute and hid when the outage began and ended.  :class:`Outage` logs the
first failure of a run with its traceback, the next ones in one line each at a growing pause
(doubling up to ``max_pause``), and the first success after them once, with how long it took.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Outage:
    log: logging.Logger
    what: str  # "delivery cycle", "batch processor cycle"
    first_pause: float
    max_pause: float = 30.0
    failures: int = 0
    _since: float = field(default=0.0, repr=False)

    def failed(self) -> float:
        """Log the failure being handled (call it in an ``except``); the pause before the next try."""
        self.failures += 1
        if self.failures == 1:
            self._since = time.monotonic()
            self.log.exception("%s failed; retrying after a pause", self.what)
        else:
            self.log.warning("%s failed again (%d in a row): %s", self.what, self.failures,
                             _reason())
        return float(min(self.max_pause, self.first_pause * 2.0 ** (self.failures - 1)))

    def succeeded(self) -> None:
        if self.failures:
            self.log.warning("%s works again after %d failed cycles in %.0f s", self.what,
                             self.failures, time.monotonic() - self._since)
            self.failures = 0


def _reason() -> str:
    """The exception being handled, in one line."""
    exc = sys.exc_info()[1]
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"
