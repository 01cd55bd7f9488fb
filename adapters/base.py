"""The adapter contract: one partner's native payload → canonical submissions or row errors.

An adapter is small and pure: ``parse(raw)`` yields :class:`ParsedRow` — a
:class:`~contracts.CESubmission` or coded errors — and never raises for bad input (a malformed
payload is a row error).  What the partner's payload is depends on the family: a JSON document
(training bases), one page item (the Cadre Network College), or a row of a tabular file
(health, finance, rosters) as a ``dict`` from header to cell.  I/O stays outside: the API,
batch processor and puller hand the adapter what they read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from contracts import CESubmission, Note


class AdapterConfig(BaseModel):
    """Per-adapter settings; subclasses add fields (e.g. credit → hour rates)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ParsedRow:
    """What an adapter makes of one native record."""

    row: int | None  # 1-based row number in a file (the header is row 1), or index in a list
    raw: Any  # the native record, kept for revalidation if rejected
    submission: CESubmission | None = None
    errors: list[Note] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)
    rule_notes: list[Note] = field(default_factory=list)  # e.g. the credit conversion applied
    credited_hours: Decimal | None = None  # when the adapter's conversion decides the hours
    credits: Decimal | None = None  # native credits, for control totals

    @property
    def ok(self) -> bool:
        return self.submission is not None and not self.errors


class Adapter(ABC):
    name: ClassVar[str]
    config_model: ClassVar[type[AdapterConfig]] = AdapterConfig

    def __init__(self, config: AdapterConfig | None = None) -> None:
        self.config = config or self.config_model()

    @abstractmethod
    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        """Yield one :class:`ParsedRow` per native record in ``raw``; never raise on bad data."""

    @classmethod
    def stored_source_id(cls, sent: str) -> str:
        """The ``source_record_id`` a record the partner sent as ``sent`` is stored under.

        A withdrawal (``DELETE /v1/records/{id}``) names the id as the partner sent it; the
        record was stored under what parsing made of it (the contract strips whitespace, full
        width spaces included), so the withdrawal looks up the same.
        """
        return sent.strip()
