"""The background half of a gateway process: delivery worker, batch processor, scheduler.

``serve`` runs it beside the HTTP server (unless ``--no-worker``); ``ce-gateway worker`` runs
only this.  Several processes may run it against one PostgreSQL store: outbox batches and
batch files are claimed by lease, scheduled jobs take a cluster-wide lease (``job_locks``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from gateway.batches import BatchProcessor
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker

log = logging.getLogger(__name__)


@dataclass
class Background:
    engine: Engine
    settings: Settings
    scheduler_enabled: bool = True
    worker: DeliveryWorker | None = None
    batches: BatchProcessor | None = None
    scheduler: Any = None
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Background:
        self.worker = DeliveryWorker(self.engine, self.settings)
        self.batches = BatchProcessor(self.engine, self.settings, name=self.worker.name)
        for name, target in (("delivery-worker", self.worker.run_forever),
                             ("batch-processor", self.batches.run_forever)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.scheduler_enabled:
            import gateway.alerts  # noqa: F401 - registers the alerts job
            import gateway.reference  # noqa: F401 - registers the reference sync job
            import gateway.retention  # noqa: F401 - registers the retention job
            from gateway.scheduling import build_scheduler

            self.scheduler = build_scheduler(self.engine, self.settings)
            self.scheduler.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.scheduler is not None:
            # Let a running job (a pull, a sync) finish its transaction before the engine goes.
            self.scheduler.shutdown(wait=True)
        for part in (self.worker, self.batches):
            if part is not None:
                part.stop()
        for thread in self._threads:
            thread.join(timeout=timeout)
        if self.worker is not None:
            self.worker.close()

    def wait(self) -> None:
        for thread in self._threads:
            while thread.is_alive():
                thread.join(timeout=1.0)
