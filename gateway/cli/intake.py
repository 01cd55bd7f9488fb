"""Records and reference data coming in from a terminal, the way the API's intake takes them.

``ce-gateway ingest``, ``pull cadre-college``, ``reference import|sync`` and ``revalidate``.
Each goes the way the API's intake goes, so validation, dedup, caps, outbox and audit behave as
for a partner's push: ``ingest`` records and processes a batch file as an upload would be,
``pull cadre-college`` is one run of the scheduled pull, ``reference`` writes a new version of
the reference data, and ``revalidate`` hands rejections back to the pipeline after that data
was fixed.  Actions are audited under ``cli:<OS user>``, or whom ``--actor`` names where a
command takes it.

May touch: through :mod:`gateway.batch_requests`, :mod:`gateway.batches`,
:mod:`gateway.pull.cadre_college`, :mod:`gateway.reference` and :mod:`gateway.revalidate`:
``batches`` and their errors, records, versions, outbox, caps ledger, ``rejections``,
``pull_state``, the reference tables and the audit trail.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from contracts.errors import message
from gateway.cli.common import _engine, _refused, _settings, _setup_logging, console, err
from gateway.errors import PayloadRejected
from gateway.ops import commands as ops_commands

pull_app = typer.Typer(help="Pull partners (the Cadre Network College)", no_args_is_help=True)
reference_app = typer.Typer(help="Reference data: bases, plans, deferrals, title applicants",
                            no_args_is_help=True)


def ingest(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    adapter: Annotated[str, typer.Option(help="health | finance | training_base")],
    kind: Annotated[str, typer.Option(help="monthly | annual | roster")],
    period: Annotated[str, typer.Option(help="YYYY-MM (monthly) or YYYY (annual)")],
    partner_id: Annotated[str | None, typer.Option(
        help="whose batch this is (default: <adapter>-local; a roster: a registered base)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ingest a batch file locally, exactly as an upload would be processed (progress bar)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from adapters.tabular import UnreadableFile, count_rows, detect_format
    from gateway.accounts import registration_of
    from gateway.batch_requests import NewBatch, check_batch_request, new_batch_id, record_batch
    from gateway.batch_status import batch_status
    from gateway.batches import TRANSIENT_FAILURES, BatchProcessor
    from gateway.errors import PayloadRejected, ScopeViolation
    from gateway.ops.overview import period_bounds
    from gateway.pipeline.rules_tables import BASE_ADAPTERS
    from gateway.signing import file_sha256
    from gateway.store.db import snapshot

    settings = _settings()
    _setup_logging(settings)
    owner = partner_id or f"{adapter}-local"
    try:  # refused as an upload would be (422), before a batch exists
        check_batch_request(adapter, kind, period, *period_bounds(settings))
        if file.stat().st_size == 0:
            raise PayloadRejected("SCHEMA", field="file", detail="(empty file)", detail_zh="（文件为空）")
        with file.open("rb") as handle:
            fmt = detect_format(handle.read(4096), file.name, None)
    except UnreadableFile as exc:  # a legacy .xls workbook
        raise _refused(PayloadRejected("SCHEMA", field="file",
                                       detail=f"(the file cannot be read: {exc})",
                                       detail_zh=f"（文件无法读取：{exc}）")) from exc
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    engine = _engine(settings)
    registered = registration_of(engine, owner)
    if registered is not None and registered[0] != adapter:
        # As an upload's scope (SPEC §7): a partner submits for its own adapter only.  A health
        # partner's name on finance rows would also count as its monthly push (missed_push).
        raise _refused(ScopeViolation(field="partner_id", detail=(
            f"(partner {owner!r} is registered for adapter {registered[0]!r}, not {adapter!r})"),
            detail_zh=f"（合作方 {owner!r} 登记的适配器是 {registered[0]!r}，不是 {adapter!r}）"))
    if adapter in BASE_ADAPTERS and (registered is None or not registered[1]):
        # A roster's rows are scoped by their partner's base code (SPEC §7): without one,
        # every row would be refused SCOPE_VIOLATION.
        raise _refused(ScopeViolation(field="partner_id", detail=(
            f"(partner {owner!r} is not a training base registered with --base-code; "
            "pass --partner-id of one)"), detail_zh=(
            f"（合作方 {owner!r} 不是用 --base-code 登记的培训基地；请用 --partner-id 指定一个）")))
    batch = NewBatch(new_batch_id(), owner, adapter, kind, period,
                     file.resolve(), fmt, file.stat().st_size, file_sha256(file))
    acknowledged = record_batch(engine, batch, actor=ops_commands.terminal_actor())
    batch_id = acknowledged.batch_id
    if acknowledged.resent:  # the same file again: its batch answers (and is resumed)
        err.print(f"the same file was taken already as batch {batch_id}; its result follows "
                  f"(同一文件已作为批次 {batch_id} 接收)", markup=False, highlight=False)
    try:
        total: int | None = count_rows(file, fmt)
    except UnreadableFile:  # processing meets it too, and fails the batch with the reason
        total = None
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err, disable=as_json) as bar:
        task = bar.add_task(f"{escape(file.name)} → {batch_id}", total=total)
        processor = BatchProcessor(engine, settings, progress=lambda row: bar.update(task, completed=row - 1))
        # This batch only: batches queued by others are the workers' (oldest first), and a
        # broken one among them must not become the failure of every later ingest.
        claimed = processor.claim(batch_id)
        failure = None
        while claimed is not None:
            failure = processor.run(claimed)
            if not isinstance(failure, TRANSIENT_FAILURES):
                break
            # Put back after a pause (the store went away, a parse worker died): take it again
            # once the pause is over; BATCH_MAX_ATTEMPTS without progress fails it for good.
            claimed, until = None, time.monotonic() + settings.batch_lease_seconds + 1
            while claimed is None and time.monotonic() < until:
                time.sleep(0.2)
                claimed = processor.claim(batch_id)
        bar.update(task, completed=total)
    with snapshot(engine) as conn:
        status = batch_status(conn, batch_id, limit=20)
    assert status is not None
    if as_json:
        print(json.dumps(status, ensure_ascii=False))
    else:
        console.print_json(data={k: status[k] for k in ("batch_id", "status", "counts", "error")})
        for row in status["rejected_rows"]:
            console.print(f"  row {row['row']} {escape(row['column'] or '')} {row['code']}: "
                          f"{escape(row['message_zh'])}")
    if isinstance(failure, UnreadableFile):  # the batch failed whole, as an upload's would
        raise _refused(PayloadRejected("SCHEMA", field="file",
                                       detail=f"(the file cannot be read: {failure})",
                                       detail_zh=f"（文件无法读取：{failure}）"))
    if status["status"] == "failed":
        err.print(f"batch {batch_id} failed: {status['error']}", style="red", markup=False,
                  highlight=False, soft_wrap=True)
    elif claimed is None:
        err.print(f"batch {batch_id} was taken by another batch processor; "
                  f"its status: {status['status']}", style="yellow", markup=False, soft_wrap=True)
    raise typer.Exit(0 if status["status"] == "done" else 1)


@pull_app.command("cadre-college")
def pull_cadre_college(
    max_pages: int | None = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    from_start: Annotated[bool, typer.Option(
        "--from-start", help="forget the stored cursor first (one the college no longer "
        "accepts); what was pulled before comes back as duplicates")] = False,
    reason: Annotated[str, typer.Option(help="why, with --from-start (kept in the audit trail)")] = "",
    actor: Annotated[str | None, typer.Option(
        help="who, with --from-start (kept in the audit trail; default cli:<OS user>)")] = None,
) -> None:
    """Pull new completions from the Cadre Network College now (cursor kept in the store)."""
    from dataclasses import asdict

    from gateway.pull.cadre_college import pull_once, reset_cursor

    settings = _settings()
    _setup_logging(settings)
    engine = _engine(settings)
    if from_start:
        if not reason.strip():
            raise _refused(PayloadRejected("SCHEMA", field="reason",
                                           detail="(--from-start needs --reason)",
                                           detail_zh="（使用 --from-start 时须说明原因 --reason）"))
        reset_cursor(engine, actor or ops_commands.terminal_actor(), reason.strip())
    result = pull_once(engine, settings, max_pages=max_pages)
    if as_json:
        print(json.dumps(asdict(result), ensure_ascii=False, default=str))
    else:
        console.print(result)
    if result.error and not result.cursor_moved:  # a failed pull is not a success (cron, CI)
        err.print(f"{result.error_code}: {message(result.error_code or 'PULL_FAILED')[0]} ({result.error})"
                  f"\n{result.error_code}: {result.error_zh}", style="red", markup=False,
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@reference_app.command("import")
def reference_import(
    kind: Annotated[str, typer.Argument(help="bases | plans | deferrals | title-applicants")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    actor: Annotated[str | None, typer.Option(
        help="who is importing (kept in the audit trail; default cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Import reference data from a CSV file (a new version; bad rows are listed, not imported)."""
    from gateway.person_keys import PersonKeys
    from gateway.reference import import_csv
    from gateway.reference_store import UnknownReferenceKind

    try:
        settings = _settings()
        result = import_csv(_engine(settings), kind, file, actor or ops_commands.terminal_actor(),
                            keys=PersonKeys(settings.person_key_secret))
    except UnknownReferenceKind as exc:
        raise _refused(PayloadRejected("SCHEMA", field="kind", detail=f"({exc})",
                                       detail_zh="（未知的参考数据类型，应为 bases、plans、deferrals 或 "
                                                 "title-applicants）")) from exc
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False, default=str))
    else:
        console.print(result.as_dict())
    raise typer.Exit(0 if result.ok else 1)


@reference_app.command("sync")
def reference_sync(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Pull changed reference data from the management system's reference API now."""
    from gateway.reference import sync

    settings = _settings()
    _setup_logging(settings)
    result = sync(_engine(settings), settings, actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps(result.as_dict(), ensure_ascii=False, default=str))
    else:
        console.print(result.as_dict())
    raise typer.Exit(0 if result.ok else 1)


def revalidate(
    partner_id: Annotated[str | None, typer.Option(help="only this partner's rejections")] = None,
    adapter: Annotated[str | None, typer.Option(help="canonical | training_base | health | finance | cadre_college")] = None,
    error_code: Annotated[str | None, typer.Option(help="only rejections with this code, e.g. BASE_NOT_RECOGNIZED")] = None,
    batch_id: Annotated[str | None, typer.Option(help="only rows of this batch")] = None,
    since: Annotated[str | None, typer.Option(help="received at or after (ISO date/time; no offset: CE_GATEWAY_TIMEZONE)")] = None,
    until: Annotated[str | None, typer.Option(help="received before this time, or through this date (ISO)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count only; change nothing")] = False,
    reason: Annotated[str | None, typer.Option(help="why (required unless --dry-run; kept in the audit trail)")] = None,
    actor: Annotated[str | None, typer.Option(help="who is acting (kept in the audit trail; default: cli:<OS user>)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-run validation for rejected records after reference data was fixed (progress bar).

    --since and --until read as the console and ``deliveries`` read them (a bare --until date
    is through that day), so a count previewed there selects the same rejections here.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.ops.common import parse_when
    from gateway.pipeline.items import RulesContext
    from gateway.pipeline.rules_tables import RulesConfig
    from gateway.reference import ReferenceCache
    from gateway.revalidate import RevalidationFilter, RevalidationRefused
    from gateway.revalidate import revalidate as run_revalidation

    settings = _settings()
    _setup_logging(settings)
    if not dry_run and not (reason and reason.strip()):
        raise _refused(PayloadRejected("SCHEMA", field="reason",
                                       detail="(--reason is required unless --dry-run)",
                                       detail_zh="（不是试运行时必须填写原因 --reason）"))
    try:
        flt = RevalidationFilter(partner_id, adapter, error_code, batch_id,
                                 parse_when(since, "since", settings.timezone),
                                 parse_when(until, "until", settings.timezone))
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    except RevalidationRefused as exc:
        raise _refused(exc.coded()) from exc
    # Audited as `deliveries reprocess` is: cli:<OS user> unless the operator names someone.
    actor = actor or ops_commands.terminal_actor()
    engine = _engine(settings)
    config = RulesConfig.from_settings(settings)
    rules = RulesContext(ReferenceCache(engine, config.keys).current(), config)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err, disable=as_json) as bar:
        task = bar.add_task("revalidating" if not dry_run else "counting", total=None)
        result = run_revalidation(engine, flt, actor=actor, reason=reason, dry_run=dry_run,
                                  rules=rules,
                                  progress=lambda done, matched: bar.update(task, completed=done,
                                                                            total=matched))
    out = result.as_dict()
    if as_json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        console.print_json(data=out)
