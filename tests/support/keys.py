"""The person keys of the suite's stores (``PERSON_KEY_SECRET``, gateway/person_keys.py).

The stores ``tests/conftest.py`` makes are migrated by :func:`gateway.store.db.upgrade` with the
environment's secret (the development default unless ``CE_GATEWAY_PERSON_KEY_SECRET`` is set),
as every :class:`~gateway.config.Settings` the tests build reads it: :data:`KEYS` is that key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import Settings
from gateway.person_keys import PersonKeys
from gateway.store.db import alembic_config

if TYPE_CHECKING:
    from alembic.config import Config

KEYS = PersonKeys(Settings().person_key_secret)


def person_key_of(id_type: str, id_number: str) -> str:
    """The stored ``person_key`` of an identity number in the suite's stores."""
    return KEYS.of(id_type, id_number)


def unsafe_downgrade_config(url: str) -> Config:
    """An Alembic config that takes a store holding person keys below migration 0020.

    For tests of older migrations only: the keyed values stay (code before 0020 would misfile
    everyone), and so does ``person_key_check``, so upgrading again does not key them twice.
    """
    cfg = alembic_config(url)
    cfg.attributes["person_keys_downgrade_unsafe"] = True
    return cfg
