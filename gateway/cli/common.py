"""What every ``ce-gateway`` command shares: its settings, its store, its coded refusals.

A command reads the one :class:`~gateway.config.Settings` through :func:`_settings` (a bad
``CE_GATEWAY_*`` variable is a coded refusal, exit 2) and opens the store through
:func:`_engine`: connected once up front, an SQLite store migrated to this code's head, a
PostgreSQL one behind it refused, the person keys checked.  An unreachable, unmigrated or
foreign store is then one coded line, not a traceback from the command's first query.
Refusals print English and Chinese, masked as the API masks its own (:func:`_coded`).
:mod:`gateway.ops.commands` (``deliveries``, ``conflicts``, ``records``) uses these too.

May touch: the environment (read, through :mod:`gateway.config`); the store's migrations
(an SQLite store behind this code is upgraded); reads ``alembic_version`` and
``person_key_check``.
"""

from __future__ import annotations

import logging
import sys

import typer
from pydantic import ValidationError
from rich.console import Console

from contracts.errors import message
from gateway.config import (
    DEV_PERSON_KEY_SECRET,
    ENV_PREFIX,
    Settings,
    get_settings,
    setting_errors,
    unknown_variables,
)
from gateway.errors import PayloadRejected

console = Console()
err = Console(stderr=True)


def _refused(exc: PayloadRejected) -> typer.Exit:
    """Print a coded refusal in English and Chinese (SPEC §6); the caller raises the Exit (2)."""
    return _coded(exc.code, exc.field, exc.message, exc.message_zh)


def _coded(code: str, field: str | None, text: str, text_zh: str) -> typer.Exit:
    """``CODE (field): English`` and ``CODE (field): 中文``; the caller raises the Exit (2).

    Masked as the API masks its refusals: what an operator typed (an identity number given as
    an error code, say) is quoted back, and terminal output ends up in tickets and logs.
    """
    from gateway.masking import mask_text

    where = f" ({field})" if field else ""
    err.print(mask_text(f"{code}{where}: {text}\n{code}{where}: {text_zh}"),
              style="red", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


_named_unknown: list[bool] = []  # once a process, however often a command reads the settings


def _settings() -> Settings:
    """The deployment's settings, or a coded refusal naming each bad variable (exit 2).

    A CE_GATEWAY_* variable that no setting reads is named in a warning, not refused: a
    Kubernetes Service named ce-gateway injects CE_GATEWAY_SERVICE_HOST and the like (those are
    left unnamed), and a variable kept for a newer release must not stop an older one.
    """
    if not _named_unknown:
        _named_unknown.append(True)
        for variable, like in unknown_variables():
            hint, hint_zh = (f"; did you mean {like}?", f"；是否应为 {like}？") if like else ("", "")
            err.print(f"warning ({variable}): not a setting, ignored{hint}\n"
                      f"warning ({variable}): 不是配置项，已忽略{hint_zh}",
                      style="yellow", markup=False, highlight=False, soft_wrap=True)
    try:
        return get_settings()
    except ValidationError as exc:
        en, zh = message("CONFIG_INVALID")
        for bad in setting_errors(exc):
            _coded("CONFIG_INVALID", bad.variable, f"{en} {bad.detail}", f"{zh}{bad.detail_zh}")
        raise typer.Exit(2) from None


def _setup_logging(settings: Settings) -> None:
    from gateway.masking import install_log_masking

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    # Alembic says "Context impl SQLiteImpl." and "Will assume non-transactional DDL." on every
    # command that opens SQLite; a migration that runs still says "Running upgrade …".
    logging.getLogger("alembic.runtime.migration").addFilter(
        lambda record: not record.getMessage().startswith(("Context impl", "Will assume")))
    install_log_masking()


def _engine(settings: Settings, migrate: bool = True):  # type: ignore[no-untyped-def]
    """The store's engine, connected once up front, its person keys checked.

    An unreachable store is then one coded line (exit 2), not a traceback from the command's
    first query; so is a PERSON_KEY_SECRET other than the store's, for every command: a
    one-off ``ingest`` or ``reference import`` from a shell without the deployment's secret
    would otherwise file everyone it writes under a second key (split caps, deferrals and
    compliance, and no command re-keys them), and a report would find nobody.
    """
    from gateway.store.db import is_sqlite, upgrade_if_behind

    engine = _connected(settings)
    if migrate and is_sqlite(engine):  # then at this code's head, or ahead of it
        upgrade_if_behind(engine, settings.database_url,
                          person_key_secret=settings.person_key_secret, settings=settings)
    else:
        _check_revision(settings, engine)
    _check_person_keys(settings, engine)
    return engine


def _check_revision(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    """Refuse (exit 2) a store behind this code's migrations, naming ``ce-gateway db upgrade``.

    PostgreSQL is migrated once a release, never by the processes (docs/operations.md): a
    command on a store nobody migrated would otherwise end in "relation … does not exist", and
    a worker would log it every cycle while its supervisor sees it running.
    """
    from sqlalchemy.engine import make_url

    from gateway.store.db import reading, revision_behind

    with reading(engine) as conn:
        behind = revision_behind(conn)
    if behind is None:
        return
    engine.dispose()
    at, head = behind
    where = make_url(settings.database_url).render_as_string(hide_password=True)
    en, zh = message("STORE_NOT_MIGRATED")
    raise _coded("STORE_NOT_MIGRATED", f"{ENV_PREFIX}DATABASE_URL",
                 f"{en} {where}: store at {at or 'no migration'}, code needs {head}.",
                 f"{zh}{where}：数据存储{f'处于迁移 {at}' if at else '从未迁移'}，"
                 f"本版本需要迁移 {head}。")


def _connected(settings: Settings):  # type: ignore[no-untyped-def]
    """The store's engine after one ``SELECT 1``: a bad URL or an unreachable store exits 2."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError

    from gateway.store.db import make_engine

    variable = f"{ENV_PREFIX}DATABASE_URL"

    def unavailable(reason: object) -> typer.Exit:
        # The driver's own words (refused, unknown host, authentication failed) on one line,
        # and the URL without its password.
        said = " ".join(str(reason).split())[:300]
        if url.password:
            said = said.replace(str(url.password), "***")
        where = url.render_as_string(hide_password=True)
        en, zh = message("STORE_UNAVAILABLE")
        return _coded("STORE_UNAVAILABLE", variable, f"{en} {where}: {said}", f"{zh}{where}：{said}")

    try:
        url = make_url(settings.database_url)
        engine = make_engine(settings.database_url)
    # Not a URL, no dialect for its scheme (NoSuchModuleError), or its driver not installed.
    except (ArgumentError, ImportError) as exc:
        en, zh = message("CONFIG_INVALID")
        raise _coded("CONFIG_INVALID", variable,
                     f"{en} Not a database URL this gateway can use: {exc}.",
                     f"{zh}不是本网关可用的数据库 URL：{exc}。") from None
    except OSError as exc:  # an SQLite file's folder that cannot be made
        raise unavailable(exc) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        engine.dispose()
        raise unavailable(exc.orig) from None
    return engine


def _check_person_keys(settings: Settings, engine) -> None:  # type: ignore[no-untyped-def]
    """Refuse (exit 2) a PERSON_KEY_SECRET other than the one the store's person keys use."""
    from gateway.person_keys import PersonKeys, WrongPersonKey, verify
    from gateway.store.db import reading

    with reading(engine) as conn:
        try:
            verify(conn, PersonKeys(settings.person_key_secret))
        except WrongPersonKey as exc:
            engine.dispose()
            en, zh = message("CONFIG_INVALID")
            raise _coded("CONFIG_INVALID", f"{ENV_PREFIX}PERSON_KEY_SECRET", f"{en} {exc}.",
                         f"{zh}该密钥不是本数据存储中人员标识所用的密钥：去重、上限与达标统计会把"
                         f"同一人分成两人。") from None


def _warn_dev_person_key(settings: Settings) -> None:
    # Not refused like the dev SECRET_KEY: that one can be replaced (partner secrets are sealed
    # again), this one cannot once a store is keyed with it (docs/operations.md).
    if settings.person_key_secret.get_secret_value() == DEV_PERSON_KEY_SECRET:
        err.print("[yellow]CE_GATEWAY_PERSON_KEY_SECRET is the development default: person "
                  "keys are as guessable as plain digests; set your own before the store holds "
                  "real people (it cannot be changed afterwards).[/yellow]")
