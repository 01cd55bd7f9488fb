"""The number of a record's next version (SPEC §3 ``version``: 1, 2, … on corrections).

Normally the one after its current version.  After the store was restored from a backup
(``ce-gateway db restored``, :mod:`gateway.backup`), a record's ``version_floor`` lifts it past
every number the management system may have received between the backup and the disaster:
the management system matches on (record id, version) and answers ``duplicate`` for a number
it holds, whatever the content, so a reused number would silently lose the new content.  The
gap keeps the order the management system checks (versions of one record arrive in order).

Every writer that makes a new version takes its number here: a partner's correction or
withdrawal, an ops edit or conflict resolution, a cap re-allocation.
"""

from __future__ import annotations

__all__ = ["next_version"]


def next_version(current: int, floor: int | None) -> int:
    """The version after ``current``, at least ``floor`` (null: the store was never restored)."""
    return current + 1 if floor is None else max(current + 1, floor)
