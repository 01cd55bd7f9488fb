"""Shared fixtures: the store on SQLite and PostgreSQL, real servers, partners, operators.

PostgreSQL runs when ``CE_GATEWAY_TEST_POSTGRES_URL`` is set (CI sets it); then an unreachable
database fails the run.  Without it the PostgreSQL cases skip with the reason.  Each
PostgreSQL test gets its own schema, dropped afterwards.  A store starts as what ``alembic
upgrade head`` leaves, copied from a template migrated once per test process (a file copy on
SQLite; on PostgreSQL the template schema's ``pg_dump``, replayed), so each test skips the
migrations; tests/integration/test_migrations.py runs them for real.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from gateway.accounts import Partner, add_operator, add_partner
from gateway.config import Settings
from gateway.delivery.worker import DeliveryWorker
from gateway.secrets_box import SecretBox
from gateway.store.db import make_engine, normalize_url, upgrade
from mock_partners.ce_system import Faults, create_app
from tests.support.delivery import MakeWorker
from tests.support.servers import uvicorn_thread
from tests.support.years import FIXTURE_YEAR_OPEN

PG_ENV = "CE_GATEWAY_TEST_POSTGRES_URL"
SECRET_KEY = "test-secret-key"


@pytest.fixture(autouse=True, scope="session")
def _fixture_year_stays_open() -> Iterator[None]:
    """The fixtures' CE year 2026 stays open after 30 Dec 2026 (see tests/support/years.py)."""
    key = "CE_GATEWAY_YEAR_CLOSE_EXTENSIONS"
    before = os.environ.get(key)
    os.environ[key] = FIXTURE_YEAR_OPEN  # read by Settings here and by every child process
    yield
    if before is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = before


TEST_CLIENT_TIMEOUT = 60.0


@pytest.fixture(autouse=True, scope="session")
def _test_clients_wait_as_a_test_may() -> Iterator[None]:
    """A test's HTTP client without a timeout of its own waits 60 s, not httpx's 5 s.

    httpx's default is a latency assertion the tests never meant: the CI machine runs the suite
    about four times slower than a developer's 2 cores, and there a console page, ``/readyz``
    or a 405 took over 5 s, two over an explicit 10 s (ReadTimeout, stop 23's CI).  The default
    ``Timeout`` object is bound as every client's default argument, so its fields are what can
    change.  Tests that check a timeout pass their own; the gateway's own clients always do.
    """
    default = httpx._config.DEFAULT_TIMEOUT_CONFIG
    before = (default.connect, default.read, default.write, default.pool)
    default.connect = default.read = default.write = default.pool = TEST_CLIENT_TIMEOUT
    yield
    default.connect, default.read, default.write, default.pool = before


def _postgres_schema_url(base: str, prefix: str = "t") -> Iterator[str]:
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # CI asked for PostgreSQL: an unreachable one is a failure
        admin.dispose()
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {exc}")
    url = make_url(normalize_url(base)).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _schema_of(url: str) -> str:
    return str(make_url(url).query["options"]).removeprefix("-csearch_path=")


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[str | None]:
    """A PostgreSQL schema migrated to head once per test process, as SQL to replay.

    ``pg_dump`` of the schema (data included: the migrations' rows), with the template's name
    as a placeholder and without its ``CREATE SCHEMA`` and psql's backslash lines.  ~0.1 s a
    test instead of ~0.4 s of migrations over ~400 PostgreSQL tests.  None (migrate each store)
    without pg_dump or when it cannot dump this server.
    """
    base = os.environ.get(PG_ENV)
    if not base or shutil.which("pg_dump") is None:
        yield None
        return
    schemas = _postgres_schema_url(base, prefix="tpl")
    url = next(schemas)
    upgrade(url)
    schema = _schema_of(url)
    libpq = make_url(base).set(drivername="postgresql").render_as_string(hide_password=False)
    dump = subprocess.run(["pg_dump", "--no-owner", "--no-privileges", "--inserts",
                           "--schema", schema, "--dbname", libpq],
                          capture_output=True, text=True, timeout=60)
    sql = None
    if dump.returncode == 0:
        lines = [line for line in dump.stdout.splitlines()
                 if not line.startswith("\\") and line != f"CREATE SCHEMA {schema};"]
        sql = "\n".join(lines).replace(schema, "{schema}")
        assert re.fullmatch(r"tpl_[0-9a-f]{12}", schema) and "{schema}.records" in sql
    yield sql
    schemas.close()  # drops the template schema


class _Schemas:
    """The PostgreSQL stores of one test process: each made before it is asked for, dropped after.

    Making a store (``CREATE SCHEMA`` and the template replayed) took ~0.13 s and dropping it
    ~0.1 s, in the test's own time: ~140 s of a run's wall time over ~600 PostgreSQL tests, most
    of it waiting on PostgreSQL.  A thread now makes the next test's schema while a test runs,
    and another drops the finished ones.  The fixtures' own statements commit without waiting
    for the WAL flush (``synchronous_commit=off``, theirs only): what the gateway commits runs
    as in production.
    """

    def __init__(self, base: str, template: str | None) -> None:
        self.base, self.template = base, template
        self.admin = create_engine(normalize_url(base), isolation_level="AUTOCOMMIT",
                                   connect_args={"options": "-csynchronous_commit=off"})
        self.ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=1)
        self.finished: queue.Queue[str | None] = queue.Queue()
        self.stopping = threading.Event()
        self.maker = threading.Thread(target=self._make_ahead, name="pg-schemas-make", daemon=True)
        self.dropper = threading.Thread(target=self._drop_behind, name="pg-schemas-drop",
                                        daemon=True)
        self.maker.start()
        self.dropper.start()

    def _make(self) -> str:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            if self.template is not None:
                conn.exec_driver_sql(self.template.replace("{schema}", schema))
        url = make_url(normalize_url(self.base)).update_query_dict(
            {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
        if self.template is None:
            upgrade(url)
        return url

    def _make_ahead(self) -> None:
        while not self.stopping.is_set():
            try:
                made: str | BaseException = self._make()
            except Exception as exc:  # noqa: BLE001 - handed to the test that asks next
                made = exc
            while not self.stopping.is_set():
                try:
                    self.ready.put(made, timeout=0.2)
                    break
                except queue.Full:
                    continue
            else:
                if isinstance(made, str):
                    self._drop(_schema_of(made))
            if isinstance(made, BaseException):
                return

    def take(self) -> str:
        made = self.ready.get(timeout=300)
        if isinstance(made, BaseException):
            self.ready.put(made)  # the maker has stopped: every later test fails the same way
            pytest.fail(f"{PG_ENV} is set but PostgreSQL is unreachable: {made}")
        return made

    def give_back(self, url: str) -> None:
        self.finished.put(_schema_of(url))

    def _drop(self, schema: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))

    def _drop_behind(self) -> None:
        while (schema := self.finished.get()) is not None:
            self._drop(schema)

    def close(self) -> None:
        self.stopping.set()
        self.maker.join(timeout=120)
        while not self.ready.empty():
            made = self.ready.get()
            if isinstance(made, str):
                self.finished.put(_schema_of(made))
        self.finished.put(None)
        self.dropper.join(timeout=120)
        self.admin.dispose()
        assert not self.dropper.is_alive(), "a test's schema could not be dropped in 120 s"


@pytest.fixture(scope="session")
def _postgres_schemas(_postgres_template: str | None) -> Iterator[_Schemas]:
    schemas = _Schemas(os.environ[PG_ENV], _postgres_template)
    yield schemas
    schemas.close()


def _postgres_store(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated, empty schema of its own: the template replayed, or the migrations run."""
    schemas: _Schemas = request.getfixturevalue("_postgres_schemas")
    url = schemas.take()
    try:
        yield url
    finally:
        schemas.give_back(url)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store migrated to head once per test process, copied for each test.

    The copy is what ``alembic upgrade head`` leaves (tests/integration/test_migrations.py
    checks the migrations themselves), in a millisecond instead of ~65 ms a test.
    """
    path = tmp_path_factory.mktemp("template") / "store.sqlite3"
    upgrade(f"sqlite:///{path}")
    assert not path.with_name(path.name + "-wal").exists(), "the template must be checkpointed"
    return path


def _migrated_sqlite(template: Path, tmp_path: Path) -> str:
    path = tmp_path / "store.sqlite3"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty store on each backend."""
    if request.param == "sqlite":
        yield _migrated_sqlite(request.getfixturevalue("_sqlite_template"), tmp_path)
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL store tests need {PG_ENV} (CI sets it; e.g. "
                    "postgresql://postgres@127.0.0.1/test)")
    yield from _postgres_store(request)


@pytest.fixture
def sqlite_url(_sqlite_template: Path, tmp_path: Path) -> str:
    return _migrated_sqlite(_sqlite_template, tmp_path)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"needs {PG_ENV}")
    yield from _postgres_store(request)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Engine]:
    """An engine on the test's store, as ``engine`` is (a test that takes both has two)."""
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    def build(db_url: str, downstream_url: str = "http://127.0.0.1:9", **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": db_url, "downstream_url": downstream_url,
            "secret_key": SECRET_KEY, "retry_schedule": (1, 1, 1), "inline_retries": 2,
            "inline_retry_max_wait_seconds": 0.05, "delivery_poll_seconds": 0.05,
            "delivery_lease_seconds": 5, "circuit_failure_threshold": 50,
            # A generous timeout: on a loaded machine a slow reply must not become a transport
            # error, an extra retry and a wrong count.  No test waits on a timeout.
            "circuit_reset_seconds": 0.5, "downstream_timeout_seconds": 30,
            # Scheduled jobs off unless a test turns one on: a job still running when a
            # test's server stops would touch a disposed engine.
            "pull_interval_seconds": 0, "reference_sync_interval_seconds": 0,
            "retention_interval_seconds": 0, "alert_interval_seconds": 0,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(SECRET_KEY)


@pytest.fixture
def new_partner(box: SecretBox) -> Callable[..., Partner]:
    def build(engine: Engine, partner_id: str | None = None, adapter: str = "canonical",
              base_code: str | None = None) -> Partner:
        return add_partner(engine, box, partner_id or f"p-{uuid.uuid4().hex[:8]}", adapter, base_code)

    return build


@pytest.fixture
def new_operator() -> Callable[..., str]:
    def build(engine: Engine, role: str = "operator") -> str:
        return add_operator(engine, f"op-{uuid.uuid4().hex[:8]}", role)[1]

    return build


@pytest.fixture
def mock_ce() -> Iterator[tuple[str, Faults]]:
    """The mock management system on a real uvicorn; yields (base URL, live Faults)."""
    faults = Faults(seed=1)
    with uvicorn_thread(create_app(faults)) as url:
        yield url, faults


@pytest.fixture
def make_worker(db_url: str, engine: Engine, mock_ce: tuple[str, Faults],
                make_settings: Callable[..., Settings]) -> Iterator[MakeWorker]:
    """Delivery workers aimed at the mock management system (or at ``client``), closed after."""
    made: list[DeliveryWorker] = []

    def build(client: httpx.Client | None = None, **overrides: Any) -> DeliveryWorker:
        worker = DeliveryWorker(engine, make_settings(db_url, mock_ce[0], **overrides),
                                client=client)
        made.append(worker)
        return worker

    yield build
    for worker in made:
        worker.close()
