"""Backing the store up, and what a restore from a backup must do before serving again.

- :func:`backup_sqlite` (``ce-gateway db backup --to FILE``): a consistent copy of a SQLite
  store while the gateway runs (SQLite's online backup API; copying the file itself can catch a
  half-written page or miss the write-ahead log), checked with ``audit verify`` on the copy, with
  a sidecar ``FILE.json`` holding the copy's audit anchor, its revision and when it was taken.
  PostgreSQL is backed up with its own tools (docs/operations.md "Backup and restore").
- :func:`mark_restored` (``ce-gateway db restored``): run once after restoring a backup and
  before anything serves.  The management system may hold versions the backup does not (made
  and delivered between the backup and the disaster); it matches a record on (record id,
  version) and answers ``duplicate`` for a number it holds whatever the content, so the next
  correction would be numbered as one of those and silently lost.  Every record's next version
  is lifted past them (``records.version_floor``, :mod:`gateway.pipeline.versions`), in one
  transaction with its ``store_restored`` audit event.

May touch: the backup file and its sidecar (``backup_sqlite``, never the store);
``records.version_floor`` and the audit trail (append) (``mark_restored``).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, func, select, update
from sqlalchemy.engine import make_url

from gateway import audit
from gateway.errors import PayloadRejected
from gateway.ops.common import refuse, require_reason
from gateway.store.db import make_engine, normalize_url, reading
from gateway.store.tables import outbox, records

__all__ = ["DEFAULT_VERSION_GAP", "Backup", "Restored", "backup_sqlite", "check_restore",
           "mark_restored"]

# More versions of one record than the gateway makes between two backups (each correction,
# withdrawal or cap re-allocation is one).  A gap too large costs nothing: the management
# system checks that versions rise, not that they follow on.
DEFAULT_VERSION_GAP = 1000
MAX_VERSION_GAP = 1_000_000


@dataclass(frozen=True)
class Backup:
    path: str
    taken_at: str
    revision: str | None
    records: int
    audit_anchor: str | None  # SEQ:HASH of the copy's audit head: keep it off the host
    audit_ok: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Restored:
    version_gap: int
    records: int  # records whose next version was lifted
    backup_taken_at: str | None
    pending: int  # deliveries pending in the backup, marked as perhaps sent already

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sqlite_file(database_url: str) -> Path:
    url = make_url(normalize_url(database_url))
    if url.get_backend_name() != "sqlite":
        raise PayloadRejected(
            "CONFIG_INVALID", field="CE_GATEWAY_DATABASE_URL",
            detail="(db backup copies a SQLite store; back PostgreSQL up with its own tools: "
                   "pg_basebackup with WAL archiving for point-in-time recovery, or pg_dump; "
                   "see docs/operations.md \"Backup and restore\")",
            detail_zh="（db backup 仅用于 SQLite 存储；PostgreSQL 请用其自带工具备份："
                      "pg_basebackup 加 WAL 归档以便按时间点恢复，或 pg_dump；"
                      "见 docs/operations.md“备份与恢复”）")
    if not url.database or url.database == ":memory:":
        raise PayloadRejected("CONFIG_INVALID", field="CE_GATEWAY_DATABASE_URL",
                              detail="(an in-memory store has nothing to back up)",
                              detail_zh="（内存数据库没有可备份的内容）")
    path = Path(url.database)
    if not path.is_file():
        raise PayloadRejected("CONFIG_INVALID", field="CE_GATEWAY_DATABASE_URL",
                              detail=f"(no store at {path})", detail_zh=f"（{path} 处没有存储）")
    return path


def backup_sqlite(database_url: str, dest: Path, now: datetime | None = None) -> Backup:
    """Copy the SQLite store to ``dest`` (a new file) and write ``dest``'s sidecar JSON."""
    source = _sqlite_file(database_url)
    sidecar = dest.with_name(dest.name + ".json")
    for target in (dest, sidecar):
        if target.exists():
            raise refuse("to", f"{target} exists; a backup never overwrites one",
                         f"{target} 已存在；备份不会覆盖已有文件")
    if not dest.parent.is_dir():
        raise refuse("to", f"no directory {dest.parent}", f"目录 {dest.parent} 不存在")
    if dest.resolve() == source.resolve():
        raise refuse("to", "that is the store itself", "这就是存储文件本身")
    taken_at = (now or datetime.now(UTC)).isoformat()
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=60)
    try:
        out = sqlite3.connect(partial)
        try:
            # In one step: the store is in WAL mode, so the copy reads one snapshot while
            # writers go on.  Copied in several steps, every write by another process would
            # restart the copy, which on a busy store might never finish.
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()
    # Checked on the copy, so the anchor kept with it is the copy's own head.
    engine = make_engine(f"sqlite:///{partial}")
    try:
        with reading(engine) as conn:
            checked = audit.verify(conn)
            count = int(conn.execute(select(func.count()).select_from(records)).scalar_one())
            revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    finally:
        engine.dispose()
    partial.replace(dest)  # only a finished, checked copy carries the backup's name
    anchor = (f"{checked.head_seq}:{checked.head_hash}"
              if checked.ok and checked.head_seq is not None else None)
    result = Backup(str(dest), taken_at, revision, count, anchor, checked.ok)
    sidecar.write_text(json.dumps(result.as_dict(), indent=2) + "\n", encoding="utf-8")
    return result


# Set on deliveries pending in the backup: they may have been sent between the backup and the
# disaster, so a "duplicate" answer for them is no news (gateway.delivery.worker never_sent).
PENDING_AT_RESTORE = ("pending when the store was restored from a backup (ce-gateway db "
                      "restored): it may have been sent before")


def check_restore(reason: str, version_gap: int, backup_taken_at: str | None) -> str:
    """Refuse bad input before anything is touched; returns the reason as kept."""
    reason = require_reason(reason)
    if not 1 <= version_gap <= MAX_VERSION_GAP:
        raise refuse("version_gap", f"between 1 and {MAX_VERSION_GAP}",
                     f"取值范围为 1 至 {MAX_VERSION_GAP}")
    if backup_taken_at is not None:
        try:
            aware = datetime.fromisoformat(backup_taken_at).tzinfo is not None
        except ValueError:
            aware = False
        if not aware:
            raise refuse("backup_taken_at",
                         "an ISO 8601 time with its offset, as the backup's sidecar says",
                         "应为带时区的 ISO 8601 时间，即备份附带文件中的 taken_at")
    return reason


def mark_restored(engine: Engine, reason: str, actor: str, *,
                  version_gap: int = DEFAULT_VERSION_GAP, backup_taken_at: str | None = None,
                  now: datetime | None = None) -> Restored:
    """Lift every record's next version ``version_gap`` past the number it would get, audited.

    The number it would get is :func:`~gateway.pipeline.versions.next_version`'s: after an
    earlier restore that is its floor, not its current version + 1, so a second restore
    (from a backup taken after the first) lifts past the numbers made since.  Run twice for
    one restore, it lifts twice: a wider gap, which costs nothing.  Deliveries pending in the
    backup are marked (:data:`PENDING_AT_RESTORE`): the management system may hold them.
    """
    reason = check_restore(reason, version_gap, backup_taken_at)
    now = now or datetime.now(UTC)
    current, floor = records.c.current_version, records.c.version_floor
    would_get_less_one = case((floor.is_not(None) & (floor - 1 > current), floor - 1),
                              else_=current)
    with engine.begin() as conn:
        lifted = conn.execute(update(records).values(
            version_floor=would_get_less_one + version_gap)).rowcount
        pending = conn.execute(update(outbox).where(
            outbox.c.status == "pending", outbox.c.last_error.is_(None))
            .values(last_error=PENDING_AT_RESTORE, updated_at=now)).rowcount
        audit.append(conn, [audit.Event("store_restored", actor=actor, detail={
            "reason": reason, "version_gap": version_gap, "records": lifted,
            "pending_deliveries": pending, "backup_taken_at": backup_taken_at})], now)
    return Restored(version_gap, lifted, backup_taken_at, pending)
