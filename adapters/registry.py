"""Adapter registry: a plain dict from name to class; an unknown name is a named error."""

from __future__ import annotations

from adapters.base import Adapter, AdapterConfig
from adapters.cadre_college import CadreCollegeAdapter
from adapters.canonical import CanonicalAdapter
from adapters.finance import FinanceAdapter
from adapters.health import HealthAdapter
from adapters.training_base import TrainingBaseAdapter, TrainingBaseRosterAdapter
from gateway.errors import GatewayError

ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls
    for cls in (CanonicalAdapter, TrainingBaseAdapter, TrainingBaseRosterAdapter,
                CadreCollegeAdapter, HealthAdapter, FinanceAdapter)
}
# Which adapter reads a batch file, by (adapter named in the request, batch kind).
BATCH_ADAPTERS: dict[tuple[str, str], str] = {
    ("health", "monthly"): "health",
    ("health", "annual"): "health",
    ("finance", "monthly"): "finance",
    ("finance", "annual"): "finance",
    ("training_base", "roster"): "training_base_roster",
}


class UnknownAdapter(GatewayError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown adapter {name!r}; known: {', '.join(sorted(ADAPTERS))}")
        self.name = name


def get_adapter(name: str, config: AdapterConfig | None = None) -> Adapter:
    try:
        cls = ADAPTERS[name]
    except KeyError:
        raise UnknownAdapter(name) from None
    return cls(config)
