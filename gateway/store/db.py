"""Engines and migrations for the store: SQLite (embedded default) or PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (a 2xx means committed, SPEC §7) and every
transaction starts ``BEGIN IMMEDIATE`` so two writers queue on the lock instead of failing on
an upgrade deadlock; only the read-only connections of :func:`reading` and :func:`snapshot`
take no write lock.  PostgreSQL uses psycopg 3.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from alembic.config import Config

    from gateway.config import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def normalize_url(url: str) -> str:
    """Let operators write ``postgresql://``; we always drive PostgreSQL with psycopg 3."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False}, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    return create_engine(url, **kwargs)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not pysqlite, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA cache_size=-65536")  # 64 MiB: bulk ingest into large indexes
        # Checkpoint the WAL every 20,000 pages (80 MiB), not SQLite's 1,000: a 2,000-row batch
        # chunk dirties ~2,000 pages of the random-keyed indexes (natural key, person), so the
        # default checkpointed after every commit, writing and syncing each page again.  Pages
        # dirtied by several commits are now copied once: a 300,000-row batch into a growing
        # store took 62-72 s instead of 70-80 s (benchmarks/RESULTS.md).
        cursor.execute("PRAGMA wal_autocheckpoint=20000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(_READS_ONLY):
            return  # no BEGIN: each read is its own snapshot and holds no lock
        # A snapshot: WAL keeps the first read's moment for the whole transaction, lock-free.
        conn.exec_driver_sql("BEGIN" if options.get(_SNAPSHOT) else "BEGIN IMMEDIATE")


_READS_ONLY = "ce_reads_only"
_SNAPSHOT = "ce_snapshot"


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for a long read that must not hold writers up: ``audit verify``.

    On SQLite each statement then sees what is committed when it runs and takes no write lock
    (a transaction here begins ``IMMEDIATE``, which would stop ingest and delivery for the whole
    read: ~25 µs an event, a minute for a year-end trail); PostgreSQL's READ COMMITTED reads so
    anyway.  What is read must hold without one snapshot across the statements.
    """
    with engine.connect().execution_options(**{_READS_ONLY: True}) as conn:
        yield conn


def alembic_config(url: str, person_key_secret: SecretStr | str | None = None) -> Config:
    """The Alembic configuration of the store at ``url``.

    ``person_key_secret`` (``PERSON_KEY_SECRET``) is what migration 0020 keys the stored person
    keys with; it travels in the config's ``attributes``, never in a file or an option.
    """
    # Alembic is imported here, not above: every ce-gateway command imports this module, and
    # Alembic is ~90 ms of a command's ~0.5 s start that only ``db upgrade`` and serving need.
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    if person_key_secret is not None:
        cfg.attributes["person_key_secret"] = (
            person_key_secret.get_secret_value() if isinstance(person_key_secret, SecretStr)
            else person_key_secret)
    return cfg


def upgrade(url: str, revision: str = "head", *,
            person_key_secret: SecretStr | str | None = None,
            settings: Settings | None = None, repairs: bool = True) -> None:
    """Apply Alembic migrations up to ``revision`` (``ce-gateway db upgrade``).

    ``person_key_secret``: the deployment's ``PERSON_KEY_SECRET`` (migration 0020 keys the
    store's person keys with it); None takes ``settings``'s, else reads it as
    :class:`~gateway.config.Settings` does (``CE_GATEWAY_PERSON_KEY_SECRET``, else the
    development default).  At the head, the data repairs the migrations queued are then run
    with this code (``store_repairs``, :mod:`gateway.repairs`), under ``settings``' rules;
    ``repairs`` False leaves them queued (``ce-gateway db restored`` runs them once it has
    lifted the version floors, so the versions they make are numbered past them too).
    """
    from alembic import command

    from gateway.config import Settings

    if settings is None:
        settings = Settings()
    if person_key_secret is None:
        person_key_secret = settings.person_key_secret
    else:
        settings = settings.model_copy(update={"person_key_secret": SecretStr(
            person_key_secret.get_secret_value() if isinstance(person_key_secret, SecretStr)
            else person_key_secret)})
    command.upgrade(alembic_config(url, person_key_secret), revision)
    if revision == "head" and repairs:
        engine = make_engine(url)
        try:
            with reading(engine) as conn:
                pending = _pending_repairs(conn)
            if pending:
                from gateway.repairs import run_pending  # the pipeline, only when needed

                run_pending(engine, settings)
        finally:
            engine.dispose()


def _pending_repairs(conn: Connection) -> list[str]:
    """The data repairs queued in ``store_repairs`` (migration 0024), by name."""
    return list(conn.execute(text("SELECT name FROM store_repairs ORDER BY name")).scalars())


def _revision_lines(source: str) -> dict[str, Any]:
    """A migration module's top-level ``revision`` and ``down_revision`` values, unrun."""
    found: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            found[target.id] = ast.literal_eval(value)
    return found


@cache
def code_revisions() -> tuple[str, frozenset[str]]:
    """The migrations this code ships: (its head, every revision it knows).

    Read from the migration modules' ``revision`` and ``down_revision`` assignments, which is
    what Alembic reads from them, parsed rather than through Alembic's script directory: that
    imports Alembic and runs every migration module, a quarter of a second of every command's
    start (``tests/unit/test_code_revisions.py`` holds the two to the same answer).
    """
    known: set[str] = set()
    parents: set[str] = set()
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found = _revision_lines(path.read_text(encoding="utf-8"))
        if "revision" not in found:
            continue  # the package's __init__.py
        known.add(found["revision"])
        down = found.get("down_revision")
        parents.update(down if isinstance(down, tuple | list) else [down] if down else [])
    heads = known - parents
    assert len(heads) == 1, f"the migrations have one head, not {sorted(heads)}"
    return heads.pop(), frozenset(known)


def revision_behind(conn: Connection) -> tuple[str | None, str] | None:
    """``(the store's revision or None if never migrated, the code's head)`` if it is behind.

    A store ahead of the code (a newer release migrated it during a rolling upgrade; migrations
    here only add) is served: the old replicas keep answering until they are replaced.  The
    version table is looked up first: querying it on a store never migrated would fail, and on
    PostgreSQL abort the caller's transaction.
    """
    head, known = code_revisions()
    at = (conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
          if inspect(conn).has_table("alembic_version") else None)
    if at == head:
        # A data repair a migration queued is part of the upgrade (migration 0024).
        pending = _pending_repairs(conn)
        return None if not pending else (f"{at} with repair {', '.join(pending)} pending", head)
    if at is not None and at not in known:
        return None
    return at, head


def upgrade_if_behind(engine: Engine, url: str, *, person_key_secret: SecretStr | str | None,
                      settings: Settings | None = None) -> bool:
    """Migrate the store to this code's head only if it is behind (:func:`revision_behind`).

    A store at the head costs one read, not an Alembic run; one a newer release migrated is left
    as it is (Alembic would stop on the revision it does not know).  True if it migrated.
    """
    with reading(engine) as conn:
        behind = revision_behind(conn)
    if behind is None:
        return False
    upgrade(url, person_key_secret=person_key_secret, settings=settings)
    return True


def migration_gap(conn: Connection) -> str | None:
    """Why this code cannot serve the store yet (it is behind the code's migrations), or None."""
    behind = revision_behind(conn)
    if behind is None:
        return None
    at, head = behind
    return f"store at {at or 'no migration'}, code needs {head} (ce-gateway db upgrade)"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one moment, for a report made of several statements.

    PostgreSQL: a read-only REPEATABLE READ transaction (READ COMMITTED, the default, lets a
    batch chunk committed between two of the report's statements count in one and not the
    other).  SQLite: a deferred transaction, which in WAL mode reads one snapshot without the
    write lock a transaction here otherwise takes, so ingest goes on while the report runs.
    Nothing may be written through it.
    """
    options: dict[str, Any] = (
        {_SNAPSHOT: True} if is_sqlite(engine)
        else {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True})
    with engine.connect().execution_options(**options) as conn:
        yield conn
