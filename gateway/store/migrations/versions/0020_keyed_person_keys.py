"""Person keys under PERSON_KEY_SECRET: every stored ``person_key`` re-keyed with an HMAC.

``person_key`` was the plain SHA-256 of the identity number, which whoever reads the store
turns back into the number by trying the candidates a region and a birth date leave.  It is now
``HMAC-SHA256(PERSON_KEY_SECRET, <that hex digest>)`` (gateway/person_keys.py).  Keying the old
digest, not the number, lets this migration re-key every value from the column alone — a pruned
stub's ``counts.person_key`` has no number beside it any more.

``natural_key`` (gateway/pipeline/dedup.py) holds the identity number too, and a record's row
keeps its year, activity type and completion date after its payload is pruned: it is keyed the
same way, in ``records`` and ``natural_keys``.

Re-keyed: ``records``, ``caps_ledger``, ``refused_pins``, ``reference_deferrals``,
``reference_title_applicants`` (their ``person_key`` column), ``reference_history`` (the key
and the stored row of deferrals and title applicants) and ``record_versions`` retention stubs
(``counts.person_key`` in the JSON payload).  Rows are read and written in chunks (bounded
memory) inside the migration's one transaction: a crash leaves the store as it was, never half
re-keyed (a half re-keyed store could not be told apart from a whole one).

The secret comes from ``gateway.store.db.upgrade`` in the Alembic config's attributes
(``person_key_secret``).  The check value (the HMAC of a fixed label) goes into the new
``person_key_check`` table; a store that has one already was keyed before (a downgrade left
it, see below) and is not keyed twice.

Downgrade: the plain digests cannot be rebuilt from the keyed ones, so a store holding person
keys refuses it.  Tests of older migrations may pass ``person_keys_downgrade_unsafe`` (the
values and ``person_key_check`` stay, so upgrading again does not re-key; code before 0020
would misfile everyone on such a store).  An empty store just loses the table.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

CHUNK = 2000
# gateway.person_keys.CHECK_LABEL, copied: a migration does not follow later code.
CHECK_LABEL = b"ce-gateway/person-key-check/v1"
# Tables whose person_key column is re-keyed in place, with their primary key (records, with
# its natural_key, in _rekey_records).
BY_PRIMARY_KEY = {'refused_pins': ('record_id',)}
# Tables whose primary key holds the person_key: re-keyed value by value.
BY_VALUE = ('caps_ledger', 'reference_deferrals', 'reference_title_applicants')
HISTORY_KINDS = ('deferrals', 'title-applicants')


def _attribute(name: str) -> Any:
    config = op.get_context().config
    return None if config is None else config.attributes.get(name)


def _secret() -> bytes:
    secret = _attribute('person_key_secret')
    if not secret or not str(secret).strip():
        raise RuntimeError(
            "migration 0020 needs PERSON_KEY_SECRET: run it through `ce-gateway db upgrade` "
            "(gateway.store.db.upgrade), which passes CE_GATEWAY_PERSON_KEY_SECRET")
    return str(secret).encode()


def _keyed(secret: bytes) -> Callable[[str], str]:
    def rekey(plain: str) -> str:
        return hmac.digest(secret, plain.encode(), 'sha256').hex()
    return rekey


def _table(name: str, *columns: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(c) for c in columns))


def _walk(conn: sa.Connection, table: sa.TableClause, key: Sequence[str],
          columns: Sequence[str], where: Any = None) -> Iterator[Sequence[sa.Row[Any]]]:
    """The table's rows in primary-key order, a chunk at a time (keyset pagination)."""
    pk = [table.c[k] for k in key]
    last: tuple[Any, ...] | None = None
    while True:
        query = sa.select(*pk, *(table.c[c] for c in columns)).order_by(*pk).limit(CHUNK)
        if where is not None:
            query = query.where(where)
        if last is not None:
            query = query.where(sa.tuple_(*pk) > sa.tuple_(*(sa.literal(v) for v in last)))
        rows = conn.execute(query).all()
        if not rows:
            return
        yield rows
        last = tuple(rows[-1][:len(key)])


def _rekey_by_primary_key(conn: sa.Connection, name: str, key: Sequence[str],
                          rekey: Callable[[str], str]) -> None:
    # The walk is by the primary key, which the update leaves alone: each row is keyed once.
    table = _table(name, *key, 'person_key')
    update = (table.update().where(*(table.c[k] == sa.bindparam(f'k_{k}') for k in key))
              .values(person_key=sa.bindparam('new')))
    for rows in _walk(conn, table, key, ['person_key']):
        conn.execute(update, [{**{f'k_{k}': r[i] for i, k in enumerate(key)},
                               'new': rekey(r.person_key)} for r in rows])


def _rekey_records(conn: sa.Connection, rekey: Callable[[str], str]) -> None:
    # records: both keys, by record_id.  natural_keys (natural_key → the record holding it) by
    # each old value met: records sharing a natural key (duplicates) meet it again, when the
    # row is renamed already and the update touches nothing; a keyed value is never an old one.
    table = _table('records', 'record_id', 'person_key', 'natural_key')
    update = table.update().where(table.c.record_id == sa.bindparam('k_record_id')).values(
        person_key=sa.bindparam('new_person'), natural_key=sa.bindparam('new_natural'))
    holders = _table('natural_keys', 'natural_key')
    rename = holders.update().where(holders.c.natural_key == sa.bindparam('old')).values(
        natural_key=sa.bindparam('new'))
    for rows in _walk(conn, table, ['record_id'], ['person_key', 'natural_key']):
        naturals = {r.natural_key: rekey(r.natural_key) for r in rows}
        conn.execute(update, [{'k_record_id': r.record_id, 'new_person': rekey(r.person_key),
                               'new_natural': naturals[r.natural_key]} for r in rows])
        conn.execute(rename, [{'old': old, 'new': new} for old, new in naturals.items()])


def _rekey_by_value(conn: sa.Connection, name: str, rekey: Callable[[str], str]) -> None:
    # person_key is in the primary key: the old values are listed first (they are few, one per
    # person with a capped activity, a deferral or a title application), so a value the update
    # wrote is never taken for one still to do.
    table = _table(name, 'person_key')
    olds = [value for values in _distinct(conn, table) for value in values]
    update = table.update().where(table.c.person_key == sa.bindparam('old')).values(
        person_key=sa.bindparam('new'))
    for start in range(0, len(olds), CHUNK):
        conn.execute(update, [{'old': o, 'new': rekey(o)} for o in olds[start:start + CHUNK]])


def _distinct(conn: sa.Connection, table: sa.TableClause) -> Iterator[list[str]]:
    last: str | None = None
    while True:
        query = sa.select(table.c.person_key).distinct().order_by(table.c.person_key).limit(CHUNK)
        if last is not None:
            query = query.where(table.c.person_key > last)
        values = list(conn.execute(query).scalars())
        if not values:
            return
        yield values
        last = values[-1]


def _rekey_history(conn: sa.Connection, rekey: Callable[[str], str]) -> None:
    # ``key`` is "<person_key>/<year>"; ``payload`` the stored row, person_key among its fields.
    table = _table('reference_history', 'id', 'kind', 'key', 'payload')
    update = table.update().where(table.c.id == sa.bindparam('k_id')).values(
        key=sa.bindparam('new_key'), payload=sa.bindparam('new_payload'))
    for rows in _walk(conn, table, ['id'], ['key', 'payload'],
                      table.c.kind.in_(HISTORY_KINDS)):
        changes = []
        for r in rows:
            plain, _, year = r.key.partition('/')
            body = json.loads(r.payload)
            if isinstance(body, dict) and body.get('person_key') == plain:
                body['person_key'] = rekey(plain)
            changes.append({'k_id': r.id, 'new_key': f'{rekey(plain)}/{year}',
                            'new_payload': json.dumps(body, ensure_ascii=False,
                                                      sort_keys=True, separators=(',', ':'))})
        conn.execute(update, changes)


def _rekey_stubs(conn: sa.Connection, rekey: Callable[[str], str]) -> None:
    # A retention stub keeps what its version counts: counts.person_key (gateway/retention.py).
    table = _table('record_versions', 'record_id', 'version', 'payload', 'pruned_at')
    update = table.update().where(table.c.record_id == sa.bindparam('k_record_id'),
                                  table.c.version == sa.bindparam('k_version')).values(
        payload=sa.bindparam('new'))
    for rows in _walk(conn, table, ['record_id', 'version'], ['payload'],
                      table.c.pruned_at.is_not(None)):
        changes = []
        for r in rows:
            body = json.loads(r.payload)
            counts = body.get('counts') if isinstance(body, dict) else None
            if isinstance(counts, dict) and isinstance(counts.get('person_key'), str):
                counts['person_key'] = rekey(counts['person_key'])
                # orjson's compact form, as gateway.retention.stub wrote it.
                changes.append({'k_record_id': r.record_id, 'k_version': r.version,
                                'new': json.dumps(body, ensure_ascii=False, separators=(',', ':'))})
        if changes:
            conn.execute(update, changes)


def upgrade() -> None:
    secret = _secret()
    check = hmac.digest(secret, CHECK_LABEL, 'sha256').hex()
    conn = op.get_bind()
    if not sa.inspect(conn).has_table('person_key_check'):
        op.create_table(
            'person_key_check',
            sa.Column('id', sa.Integer(), primary_key=True, autoincrement=False),
            sa.Column('check_value', sa.String(64), nullable=False),
        )
    checks = _table('person_key_check', 'id', 'check_value')
    stored = conn.execute(sa.select(checks.c.check_value)).scalar()
    if stored is not None:  # keyed already (a downgrade kept the values): never twice
        if not hmac.compare_digest(stored, check):
            raise RuntimeError("CE_GATEWAY_PERSON_KEY_SECRET is not the secret this store's "
                               "person keys were made with")
        return
    rekey = _keyed(secret)
    _rekey_records(conn, rekey)
    for name, key in BY_PRIMARY_KEY.items():
        _rekey_by_primary_key(conn, name, key, rekey)
    for name in BY_VALUE:
        _rekey_by_value(conn, name, rekey)
    _rekey_history(conn, rekey)
    _rekey_stubs(conn, rekey)
    conn.execute(checks.insert().values(id=1, check_value=check))


def _holds_person_keys(conn: sa.Connection) -> bool:
    for name in ('records', *BY_PRIMARY_KEY, *BY_VALUE):
        if conn.execute(sa.select(_table(name, 'person_key').c.person_key).limit(1)).first():
            return True
    versions = _table('record_versions', 'pruned_at')
    return conn.execute(sa.select(sa.literal(1)).select_from(versions)
                        .where(versions.c.pruned_at.is_not(None)).limit(1)).first() is not None


def downgrade() -> None:
    conn = op.get_bind()
    if _holds_person_keys(conn):
        if _attribute('person_keys_downgrade_unsafe'):
            return
        raise RuntimeError(
            "migration 0020 cannot be undone on a store that holds person keys: they are keyed "
            "with PERSON_KEY_SECRET and the plain digests code before 0020 uses cannot be "
            "rebuilt from them.  Restore the backup taken before upgrading instead.")
    op.drop_table('person_key_check')
