"""Looking after a deployment: the store's schema, audit chain, retention, alerts.

``ce-gateway db``, ``audit``, ``retention`` and ``alerts``: migrations (``db upgrade``: the one
way PostgreSQL is migrated, once a release), the audit chain's check, payload retention and one
evaluation of the alert conditions, each as the API or the scheduled job does it.  Actions are
audited under ``cli:<OS user>``, or whom ``--actor`` names where a command takes it.  Partner
and operator credentials (``partner``, ``operator``) are :mod:`gateway.cli.accounts`.

May touch: the schema and what a migration's data repair writes (``db upgrade``);
``record_versions`` payloads and closed ``rejections`` (``retention run``); ``alert_state``
(``alerts check``); the audit trail (appended to by ``retention run`` and a migration's data
repairs; read by ``audit verify``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gateway.cli.common import (
    _check_person_keys,
    _connected,
    _engine,
    _refused,
    _settings,
    _setup_logging,
    _warn_dev_person_key,
    console,
    err,
)
from gateway.errors import PayloadRejected
from gateway.ops import commands as ops_commands

db_app = typer.Typer(help="Database migrations", no_args_is_help=True)
audit_app = typer.Typer(help="Audit trail", no_args_is_help=True)
retention_app = typer.Typer(help="Payload retention (the audit trail is never pruned)",
                              no_args_is_help=True)
alerts_app = typer.Typer(help="Alerts to the ops group robot (WeCom / DingTalk)", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply Alembic migrations to CE_GATEWAY_DATABASE_URL."""
    from gateway.store.db import upgrade

    settings = _settings()
    _warn_dev_person_key(settings)
    engine = _connected(settings)  # an unreachable store: STORE_UNAVAILABLE, exit 2
    _check_person_keys(settings, engine)  # a data repair files people under the store's keys
    engine.dispose()
    upgrade(settings.database_url, revision, person_key_secret=settings.person_key_secret,
            settings=settings)
    console.print(f"database at revision {escape(revision)}")


@db_app.command("backup")
def db_backup(
    to: Annotated[Path, typer.Option("--to", help="the new backup file (never overwritten); its "
                                     "audit anchor goes to FILE.json beside it")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Copy a SQLite store while the gateway runs, checked; PostgreSQL uses its own tools."""
    from gateway.backup import backup_sqlite

    try:
        made = backup_sqlite(_settings().database_url, to)
    except PayloadRejected as exc:
        raise _refused(exc) from None
    if as_json:
        print(json.dumps(made.as_dict()))
    elif made.audit_ok:
        console.print(f"backup written to {escape(made.path)} ({made.records} records, revision "
                      f"{made.revision}); audit anchor [bold]{made.audit_anchor}[/bold] — keep it, "
                      f"with {escape(made.path)}.json, off this host")
    else:
        console.print(f"[red]backup written to {escape(made.path)}, but its audit chain does not "
                      "verify[/red]: run `ce-gateway audit verify` on the store")
    raise typer.Exit(0 if made.audit_ok else 1)


@db_app.command("restored")
def db_restored(
    reason: Annotated[str, typer.Option(help="why the store was restored (kept in the audit)")],
    version_gap: Annotated[int, typer.Option(
        help="how far past its current version each record's next version is numbered")] = 1000,
    backup_taken_at: Annotated[str | None, typer.Option(
        help="taken_at from the backup's FILE.json, kept in the audit")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """After restoring a backup, before serving: lift every record's next version number.

    In this order: the schema is migrated if the backup is from an earlier release, the floors
    are set, then the data repairs the migrations queued run — after the floors, so the
    versions a repair makes are numbered past them too.
    """
    from gateway.backup import check_restore, mark_restored
    from gateway.store.db import upgrade

    try:
        check_restore(reason, version_gap, backup_taken_at)
    except PayloadRejected as exc:
        raise _refused(exc) from None
    settings = _settings()
    _warn_dev_person_key(settings)
    engine = _connected(settings)  # not _engine: on SQLite it would run the repairs first
    _check_person_keys(settings, engine)
    upgrade(settings.database_url, person_key_secret=settings.person_key_secret,
            settings=settings, repairs=False)
    done = mark_restored(engine, reason, ops_commands.terminal_actor(),
                         version_gap=version_gap, backup_taken_at=backup_taken_at)
    engine.dispose()
    upgrade(settings.database_url, person_key_secret=settings.person_key_secret,
            settings=settings)  # at the head already: only the queued repairs run
    if as_json:
        print(json.dumps(done.as_dict()))
        return
    console.print(f"store marked restored: the next version of {done.records} records is "
                  f"numbered {done.version_gap} past the one it would have had; "
                  f"{done.pending} pending deliveries may have been sent already "
                  "(docs/operations.md \"Backup and restore\" lists what else to do)")


@audit_app.command("verify")
def audit_verify(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    anchor: Annotated[str | None, typer.Option(
        help="SEQ:HASH, the head_seq and head_hash an earlier --json run printed and you kept "
             "outside the database: a chain rewritten from that event on is found too")] = None,
) -> None:
    """Walk the hash chain; exit 1 and name the first bad event on any edit, deletion or move."""
    from gateway import audit
    from gateway.store.db import reading

    try:
        kept = None if anchor is None else audit.parse_anchor(anchor)
    except ValueError as exc:
        raise _refused(PayloadRejected("SCHEMA", field="anchor", detail=f"({exc})",
                                       detail_zh="（锚点格式为 序号:哈希，即先前 verify --json "
                                                 "输出的 head_seq 与 head_hash）")) from None
    engine = _engine(_settings(), migrate=False)
    with reading(engine) as conn:
        result = audit.verify(conn, anchor=kept)
    engine.dispose()
    if as_json:
        print(json.dumps(result.as_dict()))
    elif result.ok:
        console.print(f"[green]audit chain intact[/green]: {result.checked} events")
    else:
        console.print(f"[red]audit chain broken at event {result.first_bad_seq}[/red]: "
                      f"{escape(result.reason or '')}")
    raise typer.Exit(0 if result.ok else 1)


@retention_app.command("run")
def retention_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count only; change nothing")] = False,
    actor: Annotated[str | None, typer.Option(
        help="who is acting (kept in the audit trail; default cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Prune delivered payloads and finished batches' files (RETENTION_PAYLOAD_DAYS)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.retention import prune

    settings = _settings()
    _setup_logging(settings)
    engine = _engine(settings)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, disable=as_json) as bar:
        task = bar.add_task("counting" if dry_run else "pruning", total=None)
        result = prune(engine, settings, dry_run=dry_run, actor=actor or ops_commands.terminal_actor(),
                       progress=lambda done, total: bar.update(task, completed=done, total=total))
    engine.dispose()
    if as_json:
        print(json.dumps(result.as_dict()))
    elif result.cutoff is None:
        console.print("retention is off (CE_GATEWAY_RETENTION_PAYLOAD_DAYS=0): nothing pruned")
    else:
        verb, removed = ("would prune", "would remove") if dry_run else ("pruned", "removed")
        console.print(f"{verb} {result.versions} version payloads and {result.rejections} closed "
                      f"rejections delivered/received before {result.cutoff.isoformat()}; "
                      f"{removed} {result.batch_files} files of batches finished before then "
                      f"and {result.upload_leftovers} leftovers of uploads that never finished")


@alerts_app.command("check")
def alerts_check(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Evaluate the alert conditions once and send what is new (as the scheduled job does)."""
    from rich.table import Table

    from gateway.alerts import evaluate

    settings = _settings()
    result = evaluate(_engine(settings), settings)
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False))
    else:
        if not result.configured:
            console.print("[yellow]CE_GATEWAY_ALERT_WEBHOOK_URL is not set: nothing is sent[/yellow]")
        outcome = {**dict.fromkeys(result.fired, "[green]sent 已发送"),
                   **dict.fromkeys(result.already, "sent before 已告警"),
                   **{k: f"[red]failed 发送失败: {escape(v)}" for k, v in result.failed.items()}}
        table = Table("condition 告警", "key", "outcome", title=f"alerts at {result.now.isoformat()}")
        for c in result.active:
            table.add_row(c.title, c.key, outcome.get(c.key, "not sent 未发送 (no URL)"))
        console.print(table if result.active else "no active alert conditions 无告警")
        for key in result.cleared:
            console.print(f"cleared 已恢复: {key}")
    raise typer.Exit(1 if result.failed else 0)
