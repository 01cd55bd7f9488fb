"""What one running gateway process holds: settings, engine, secret box, worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine

from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.pipeline.items import RulesContext
from gateway.pipeline.rules_tables import RulesConfig
from gateway.reference import ReferenceCache
from gateway.secrets_box import SecretBox
from gateway.store.db import make_engine


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    box: SecretBox
    references: ReferenceCache
    rules_config: RulesConfig
    worker: DeliveryWorker | None = None
    nonce_inserts: int = field(default=0)

    @classmethod
    def build(cls, settings: Settings) -> AppState:
        engine = make_engine(settings.database_url)
        config = RulesConfig.from_settings(settings)
        return cls(settings, engine, SecretBox(settings.secret_key.get_secret_value()),
                   ReferenceCache(engine, config.keys), config)

    def rules(self) -> RulesContext:
        """The rules context for one request: call it before opening the ingest transaction."""
        return RulesContext(self.references.current(), self.rules_config)
