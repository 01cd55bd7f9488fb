"""``person_key``: who a record is about, as the store keeps it (never the identity number).

``person_key = HMAC-SHA256(PERSON_KEY_SECRET, plain)`` in lowercase hex, where ``plain`` is
the lowercase hex SHA-256 of ``"person" US id_type US ID_NUMBER`` (US: the unit separator
U+001F; the number stripped and upper-cased).  ``plain`` alone was the key before migration 0020: an 18-character
resident id has little entropy (region, birth date, three digits, a check character), so whoever
read the store recovered the number from it by trying the ~11,000 candidates a region and a
birth date leave.  With the HMAC, a reader of the store needs the secret too.

``natural_key`` (gateway/pipeline/dedup.py) is keyed the same way (:meth:`PersonKeys.rekey` of
its plain digest).  The secret keys the *plain digest*, not the number, so migration 0020 re-keyed every stored
value (a pruned stub's ``counts.person_key`` too, which no longer has the number beside it) as
a function of the column alone.  ``PERSON_KEY_SECRET`` is not ``SECRET_KEY``: that one may be
rotated, this one is fixed for the store's life (every dedup, cap and compliance lookup joins
on it; there is no re-key command).

The store keeps a check value (:data:`CHECK_LABEL` under the key, table ``person_key_check``,
written by migration 0020).  A process whose secret does not give it would file one person
under two keys — splitting her caps, deferrals and compliance — so ``serve``, ``worker`` and
``/readyz`` refuse it (:func:`verify`, :class:`WrongPersonKey`).

May touch: reads ``person_key_check``.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr
from sqlalchemy import Connection, select
from sqlalchemy.exc import DBAPIError

from gateway.errors import ConfigError
from gateway.store.tables import person_key_check

__all__ = ["CHECK_LABEL", "PersonKeys", "WrongPersonKey", "plain_digest", "stored_check",
           "verify"]

# What the check value is the HMAC of.  Migration 0020 writes the same bytes (it keeps its own
# copy, as migrations do): change neither.
CHECK_LABEL = b"ce-gateway/person-key-check/v1"


def plain_digest(id_type: str, id_number: str) -> str:
    """The unkeyed SHA-256 (the pre-0020 ``person_key``): an input of the HMAC, never stored."""
    text = "\x1f".join(("person", id_type, id_number.strip().upper()))
    return hashlib.sha256(text.encode()).hexdigest()


class PersonKeys:
    """The keyed ``person_key`` function of one ``PERSON_KEY_SECRET`` (immutable, thread-safe)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: str | SecretStr) -> None:
        raw = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if not raw.strip():
            raise ValueError("PERSON_KEY_SECRET must not be empty")
        self._secret = raw.encode()

    def __repr__(self) -> str:  # never the secret
        return "PersonKeys(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PersonKeys) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:  # batch jobs holding one key a cache
        return hash(self.check())

    def __reduce__(self) -> tuple[type[PersonKeys], tuple[str]]:
        # Batch parse workers (separate processes) receive it with their job.
        return (PersonKeys, (self._secret.decode(),))

    def of(self, id_type: str, id_number: str) -> str:
        """The person key of an identity number of ``id_type`` (``resident_id`` …)."""
        return self.rekey(plain_digest(id_type, id_number))

    def rekey(self, plain: str) -> str:
        """The person key of a plain digest (what migration 0020 applies to stored values)."""
        return hmac.digest(self._secret, plain.encode(), "sha256").hex()

    def check(self) -> str:
        """The value the store keeps to tell this secret from another."""
        return hmac.digest(self._secret, CHECK_LABEL, "sha256").hex()

    def matches(self, stored_check: str) -> bool:
        """Whether a store's check value was made with this secret."""
        return hmac.compare_digest(stored_check, self.check())


class WrongPersonKey(ConfigError):
    """A ``PERSON_KEY_SECRET`` other than the one the store's person keys were made with."""

    def __init__(self) -> None:
        super().__init__(
            "CE_GATEWAY_PERSON_KEY_SECRET is not the secret this store's person keys were made "
            "with: dedup, caps and compliance would file one person under two keys")


def stored_check(conn: Connection) -> str | None:
    """The store's check value, or None before migration 0020 (``migration_gap`` says so)."""
    try:
        return conn.execute(select(person_key_check.c.check_value)).scalar()
    except DBAPIError:  # no such table yet: the store is behind the code
        conn.rollback()
        return None


def verify(conn: Connection, keys: PersonKeys) -> None:
    """Raise :class:`WrongPersonKey` unless the store was keyed with ``keys`` (or is not yet)."""
    stored = stored_check(conn)
    if stored is not None and not keys.matches(stored):
        raise WrongPersonKey()
