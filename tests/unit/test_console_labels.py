"""Every audit event the gateway writes has a Chinese label on the console (zh-CN).

The console shows an event kind it has no label for as its English key, which an operator
reading a record's timeline in Chinese should never meet.  The kinds are found in the source,
where ``audit.Event("kind", …)`` is built, so a new kind without a label fails here.  A kind
built from a template (the batch worker's ``Event(f"batch_{status}", …)``) is expanded by the
table below; a new template not in it fails, so it cannot slip past the scan.
"""

from __future__ import annotations

import re
from pathlib import Path

import gateway
from gateway.console.render import EVENT_ZH, RETIRED_EVENT_KINDS

_BUILT = re.compile(r'Event\(\s*"([a-z_]+)"')
_TEMPLATE = re.compile(r'Event\(\s*f"([^"]+)"')
_ROOT = Path(gateway.__file__).parent


def _batch_statuses() -> set[str]:
    """What the batch worker finishes a batch as: ``self._finish(batch_id, "done", …)``."""
    return set(re.findall(r'_finish\(\s*batch_id,\s*"([a-z_]+)"',
                          (_ROOT / "batches.py").read_text()))


# A kind built from a template → every kind it writes.
_EXPANDED = {"batch_{status}": lambda: {f"batch_{s}" for s in _batch_statuses()}}


def _templates_written() -> set[str]:
    return {t for path in _ROOT.rglob("*.py") for t in _TEMPLATE.findall(path.read_text())}


def _kinds_written() -> set[str]:
    literal = {kind for path in _ROOT.rglob("*.py") for kind in _BUILT.findall(path.read_text())}
    built = {kind for t in _templates_written() if t in _EXPANDED for kind in _EXPANDED[t]()}
    return literal | built


def test_every_templated_event_kind_is_expanded() -> None:
    assert sorted(_templates_written() - set(_EXPANDED)) == []
    assert {"batch_done", "batch_failed"} <= _kinds_written()  # the batch worker's two ends


def test_every_event_kind_written_has_a_chinese_label() -> None:
    kinds = _kinds_written()
    assert {"received", "queued", "cap_reallocated", "retention_pruned"} <= kinds  # the scan works
    assert sorted(kinds - set(EVENT_ZH)) == []


def test_no_label_is_left_for_a_kind_never_written() -> None:
    assert sorted(set(EVENT_ZH) - _kinds_written() - RETIRED_EVENT_KINDS) == []
    assert RETIRED_EVENT_KINDS <= set(EVENT_ZH) and not RETIRED_EVENT_KINDS & _kinds_written()


def test_labels_are_chinese() -> None:
    assert all(re.search(r"[\u4e00-\u9fff]", label) for label in EVENT_ZH.values())
