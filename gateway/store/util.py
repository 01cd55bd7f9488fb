"""Small dialect-aware statements shared by the store's writers, and storable text."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignore(conn: Connection, table: Table, values: dict[str, Any] | list[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING on SQLite and PostgreSQL alike."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(dialect_insert(table).on_conflict_do_nothing(), values)


# NUL (PostgreSQL text refuses it) and lone UTF-16 surrogates (no encoding writes them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """``text`` with what no store or JSON writer takes replaced by U+FFFD.

    A lone surrogate comes from a partner's JSON (an escaped U+D840 alone: a Chinese name cut inside a
    surrogate pair by a UTF-16 system), which Python's json reads and orjson does not.
    """
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub("\ufffd", text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))


def storable(value: Any) -> Any:
    """``value`` with storable text and integers beyond 64 bits as their digits."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2 ** 63) <= value < 2 ** 64 else str(value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def dumps_storable(value: Any, option: int = 0) -> str:
    """JSON of what a partner sent, as received as can be: a rejected row is filed with it.

    orjson refuses lone surrogates, integers beyond 64 bits and nesting deeper than 254: those
    are written as U+FFFD, as digits, and through Python's json; a value deeper than Python
    can walk is filed as its text, cut short.  So the row is filed and answered rather than
    failing everything committed with it.
    """
    try:
        return orjson.dumps(value, default=str, option=option).decode()
    except TypeError:
        pass
    try:
        return orjson.dumps(storable(value), default=str, option=option).decode()
    except (TypeError, RecursionError):
        pass
    try:
        return json.dumps(storable(value), default=str, ensure_ascii=False,
                          sort_keys=bool(option & orjson.OPT_SORT_KEYS))
    except (TypeError, ValueError, RecursionError):
        return json.dumps({"unreadable": storable_text(repr(value)[:4096])}, ensure_ascii=False)
