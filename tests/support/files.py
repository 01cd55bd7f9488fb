"""Batch files as tests need them beside what mock_partners/files.py writes."""

from __future__ import annotations

from pathlib import Path


def another_export(path: Path) -> Path:
    """The same rows in other bytes (a blank line more at the end), beside ``path``.

    A byte-identical file is a resend of the batch that took it, never taken twice
    (gateway/batch_requests.record_batch); another export of the same rows is a batch of its own,
    whose rows dedup one by one.
    """
    again = path.with_name("again-" + path.name)
    again.write_bytes(path.read_bytes() + b"\r\n")
    return again
