"""The ``canonical`` adapter: partners that already speak the contract (SPEC §3)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from adapters.base import Adapter, ParsedRow
from gateway.pipeline.validate import note, validate_submission


class CanonicalAdapter(Adapter):
    name: ClassVar[str] = "canonical"

    def parse(self, raw: Any) -> Iterator[ParsedRow]:
        """``raw`` is ``{"records": [...]}`` or a list of submissions; one row per submission."""
        items = raw.get("records") if isinstance(raw, dict) else raw
        if not isinstance(items, list):
            items = [raw]
        if not items:  # SPEC §5: 1-1,000 records a request; an empty list is malformed, not "nothing"
            yield ParsedRow(row=0, raw=raw, errors=[note("SCHEMA", "no records (expected 1-1,000)",
                                                         field="records",
                                                         detail_zh="没有记录（应为 1-1,000 条）")])
            return
        for index, item in enumerate(items):
            v = validate_submission(item)
            yield ParsedRow(row=index, raw=item, submission=v.submission, errors=list(v.errors),
                            warnings=list(v.warnings))
