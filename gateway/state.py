"""What one running gateway process holds: settings, engine, secret box, worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.secrets_box import SecretBox
from gateway.store.db import make_engine


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    box: SecretBox
    worker: DeliveryWorker | None = None
    nonce_inserts: int = field(default=0)

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        return cls(settings, make_engine(settings.database_url),
                   SecretBox(settings.secret_key.get_secret_value()))
