"""Data repairs a migration queued (``store_repairs``, migration 0024), run with this code.

A migration runs the code of its own day; a repair that needs today's rules (a cap group
allocated again, say) is queued by the migration and run here, by ``gateway.store.db.upgrade``,
once the store is at the head.  Each repair runs in one transaction that also deletes its
``store_repairs`` row and appends its audit events, so a crash leaves it queued and the next
``ce-gateway db upgrade`` runs it again; until then the store is not ready
(``db.revision_behind``).  Two upgrades at once queue on the row: the second finds it gone and
does nothing.  Every repair is safe to run twice.

Repairs:

- ``refused_pins``: records the management system refused for good before migration 0019 get
  the ``refused_pins`` row this code writes when such a refusal lands, and their cap groups are
  allocated again (R10, 青人社厅函〔2022〕394号 四(二)1–4) — exactly what the delivery worker does
  today (:func:`gateway.pipeline.succession.reallocate_after_delivery`).  Records whose share moved
  get a new version, forwarded like any re-allocation.

May touch: ``store_repairs`` (delete), what a repair writes (``refused_pins``, records,
versions and outbox through the re-allocation), the audit trail (append).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, select

from gateway import audit
from gateway.config import Settings
from gateway.person_keys import verify
from gateway.pipeline import caps
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import reallocate_after_delivery
from gateway.store.tables import outbox, refused_pins, store_repairs

__all__ = ["ACTOR", "REPAIRS", "run_pending"]

log = logging.getLogger(__name__)
ACTOR = "db-upgrade"

Repair = Callable[[Connection, RulesConfig, datetime], tuple[list[audit.Event], dict[str, Any]]]


def _refused_pins(conn: Connection, config: RulesConfig, now: datetime,
                  ) -> tuple[list[audit.Event], dict[str, Any]]:
    """Pin the records refused for good and allocate their groups again (module docstring)."""
    ids = conn.execute(select(outbox.c.record_id).distinct().where(
        outbox.c.status == "dead", outbox.c.error_code.in_(caps.REFUSED_FOR_GOOD))).scalars()
    refused = caps.refused_now(conn, ids)
    events = reallocate_after_delivery(
        conn, config, now, sorted(refused.items()), actor=ACTOR,
        reason="data repair refused_pins (migration 0024): a record refused for good before "
               "migration 0019 keeps its applied version's share")
    pins = conn.execute(select(func.count()).select_from(refused_pins)).scalar_one()
    return events, {"refused_records": len(refused), "pins": int(pins)}


REPAIRS: dict[str, Repair] = {"refused_pins": _refused_pins}


def run_pending(engine: Engine, settings: Settings, now: datetime | None = None) -> list[str]:
    """Run every queued repair this code knows, each in its own transaction; their names.

    A repair this code does not know (a newer release queued it) is left for that release.
    The store's check refuses a ``PERSON_KEY_SECRET`` other than its own before anything is
    written (:func:`gateway.person_keys.verify`).
    """
    config = RulesConfig.from_settings(settings)
    done: list[str] = []
    with engine.connect() as conn:
        names = list(conn.execute(select(store_repairs.c.name).order_by(store_repairs.c.name))
                     .scalars())
    for name in names:
        repair = REPAIRS.get(name)
        if repair is None:
            log.warning("data repair %s is queued but unknown to this release: left queued", name)
            continue
        at = now or datetime.now(UTC)
        with engine.begin() as conn:
            verify(conn, config.keys)
            if conn.execute(delete(store_repairs).where(store_repairs.c.name == name)).rowcount != 1:
                continue  # another upgrade ran it meanwhile
            events, counts = repair(conn, config, at)
            audit.append(conn, [*events, audit.Event("store_repaired", actor=ACTOR,
                                                     detail={"repair": name, **counts})], at)
        log.info("data repair %s done: %s", name, counts)
        done.append(name)
    return done
