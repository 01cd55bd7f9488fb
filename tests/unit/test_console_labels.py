"""Every audit event the gateway writes has a Chinese label on the console (zh-CN).

The console shows an event kind it has no label for as its English key, which an operator
reading a record's timeline in Chinese should never meet.  The kinds are found in the source,
where ``audit.Event("kind", …)`` is built, so a new kind without a label fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import gateway
from gateway.console.render import EVENT_ZH

_BUILT = re.compile(r'Event\(\s*"([a-z_]+)"')


def _kinds_written() -> set[str]:
    root = Path(gateway.__file__).parent
    return {kind for path in root.rglob("*.py") for kind in _BUILT.findall(path.read_text())}


def test_every_event_kind_written_has_a_chinese_label() -> None:
    kinds = _kinds_written()
    assert {"received", "queued", "cap_reallocated", "retention_pruned"} <= kinds  # the scan works
    assert sorted(kinds - set(EVENT_ZH)) == []


def test_no_label_is_left_for_a_kind_never_written() -> None:
    assert sorted(set(EVENT_ZH) - _kinds_written()) == []


def test_labels_are_chinese() -> None:
    assert all(re.search(r"[\u4e00-\u9fff]", label) for label in EVENT_ZH.values())
