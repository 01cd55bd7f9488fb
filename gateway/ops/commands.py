"""``ce-gateway deliveries …`` and ``ce-gateway conflicts …``: the ops API from a terminal.

Typer sub-apps registered by :mod:`gateway.cli`; they call :mod:`gateway.ops` on the store
directly, like the other commands.  Actions are audited under ``cli:<operator>`` (``--operator``,
else the OS user).  A coded refusal prints its English and Chinese message and exits 2 (bad
input) or 1 (not found, wrong state).
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway.errors import NotFound, PayloadRejected
from gateway.store.db import snapshot

deliveries_app = typer.Typer(help="Deliveries to the management system: list, show, reprocess",
                             no_args_is_help=True)
conflicts_app = typer.Typer(help="Conflicts (same activity, different hours) held for ops",
                            no_args_is_help=True)
records_app = typer.Typer(help="Records: one record's versions, deliveries and timeline",
                          no_args_is_help=True)
console = Console()
err = Console(stderr=True)

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
OperatorName = Annotated[str | None, typer.Option("--operator",
                                                  help="who is acting (default: the OS user)")]


def terminal_actor(name: str | None = None) -> str:
    """``cli:<name>``, else ``cli:<OS user>``: who an action from this terminal is audited as."""
    try:
        who = name or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        who = "unknown"
    return f"cli:{who}"[:64]


@contextmanager
def _coded() -> Iterator[None]:
    """Print a coded refusal (en + zh) and exit instead of a traceback.

    As every command prints one (:func:`gateway.cli.common._coded`): ``CODE (field): English``
    and ``CODE (field): 中文``, without Rich markup, as the message quotes what the operator
    typed.
    """
    from gateway.cli.common import _coded as coded

    try:
        yield
    except PayloadRejected as exc:
        coded(exc.code, exc.field, exc.message, exc.message_zh)
        raise typer.Exit(2 if exc.status_code == 422 else 1) from exc


def _engine() -> Any:
    from gateway.cli.common import _engine as make
    from gateway.cli.common import _settings

    return make(_settings())


def _timezone() -> str:
    from gateway.cli.common import _settings

    return _settings().timezone


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, default=str))


def _filter(status: str | None, adapter: str | None, partner: str | None,
            error_code: str | None, since: str | None, until: str | None,
            ids: list[str] | None = None) -> Any:
    from gateway.ops.common import parse_when
    from gateway.ops.deliveries import DeliveryFilter

    tz = _timezone()
    return DeliveryFilter(status=status, adapter=adapter, partner_id=partner,
                          error_code=error_code, since=parse_when(since, "since", tz),
                          until=parse_when(until, "until", tz), record_ids=tuple(ids or ()))


Status = Annotated[str | None, typer.Option(help="pending | delivered | dead | superseded")]
Adapter = Annotated[str | None, typer.Option(help="canonical | training_base | health | finance | cadre_college")]
PartnerOpt = Annotated[str | None, typer.Option("--partner", help="partner id")]
ErrorCode = Annotated[str | None, typer.Option("--error-code", help="e.g. RETRIES_EXHAUSTED")]
Since = Annotated[str | None, typer.Option(help="updated at or after (ISO date/time; no offset: CE_GATEWAY_TIMEZONE)")]
Until = Annotated[str | None, typer.Option(help="updated before this time, or through this date (ISO)")]


@deliveries_app.command("list")
def deliveries_list(status: Status = None, adapter: Adapter = None, partner: PartnerOpt = None,
                    error_code: ErrorCode = None, since: Since = None, until: Until = None,
                    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
                    cursor: Annotated[str | None, typer.Option(help="next page (from a previous list)")] = None,
                    as_json: Json = False) -> None:
    """Deliveries, newest first (filters combine)."""
    from gateway.ops.deliveries import list_deliveries

    with _coded():
        flt = _filter(status, adapter, partner, error_code, since, until)
        with snapshot(_engine()) as conn:
            page = list_deliveries(conn, flt, cursor=cursor, limit=limit)
    if as_json:
        _print_json(page)
        return
    table = Table("id", "record", "v", "status", "adapter", "partner", "tries", "error",
                  "updated", title=f"投递 deliveries ({page['total']})")
    colour = {"dead": "red", "pending": "yellow", "delivered": "green"}
    for d in page["items"]:  # table cells are Rich markup: ids an operator typed are escaped
        table.add_row(str(d["id"]), escape(d["record_id"]), str(d["version"]),
                      f"[{colour.get(d['status'], 'white')}]{d['status']}", d["adapter"],
                      escape(d["partner_id"]), str(d["attempts"]), d["error_code"] or "",
                      (d["updated_at"] or "")[:19])
    console.print(table)
    if page["next"]:
        console.print(f"more: --cursor {page['next']}")


@deliveries_app.command("show")
def deliveries_show(delivery_id: Annotated[int, typer.Argument(help="delivery id (from list)")],
                    as_json: Json = False) -> None:
    """One delivery: its batch, earlier batches it died in, its history."""
    from gateway.ops.deliveries import get_delivery

    with _coded():
        with snapshot(_engine()) as conn:
            found = get_delivery(conn, delivery_id)
        if found is None:
            raise NotFound(field="delivery_id", detail=f"(no delivery {delivery_id})",
                           detail_zh=f"（投递 {delivery_id}）")
    _show(found, "history", "history", as_json)


@records_app.command("show")
def records_show(record_id: Annotated[str, typer.Argument(help="record id (R…, from an answer)")],
                 as_json: Json = False) -> None:
    """One record: its current version, versions, deliveries and timeline (SPEC §2)."""
    from gateway.masking import mask_text, masked
    from gateway.ops.records import record_view

    with _coded():
        with snapshot(_engine()) as conn:  # the record and its deliveries at one moment
            view = record_view(conn, record_id)
        if view is None:
            shown = mask_text(record_id[:64].replace("\x00", "?"))
            raise NotFound(field="record_id", detail=f"(no record {shown})",
                           detail_zh=f"（记录 {shown}）")
    # Masked as the console and GET /v1/records/{id} show it: terminal output ends up in
    # tickets and logs.  The structure, not its JSON text, where a line break in a field is an
    # escape (``\n``).
    _show(masked(view), "timeline", f"时间线 timeline ({record_id})", as_json)


def _show(found: dict[str, Any], events: str, title: str, as_json: bool) -> None:
    """One thing with its audit events: JSON for scripts, or its fields and an events table."""
    if as_json:
        _print_json(found)
        return
    console.print_json(data={k: v for k, v in found.items() if k != events}, default=str)
    table = Table("at", "event", "actor", "detail", title=escape(title))
    for e in found[events]:  # actors and reasons are what operators typed, not markup
        table.add_row(str(e["at"])[:19], e["kind"], escape(e["actor"]),
                      escape(json.dumps(e["detail"], ensure_ascii=False)[:120]))
    console.print(table)


@deliveries_app.command("reprocess")
def deliveries_reprocess(
    reason: Annotated[str | None, typer.Option(
        help="why (kept in the audit trail); required unless --dry-run")] = None,
    status: Status = None, adapter: Adapter = None, partner: PartnerOpt = None,
    error_code: ErrorCode = None, since: Since = None, until: Until = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="a record id (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count only; change nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    ceiling: Annotated[int | None, typer.Option(
        min=0, max=2**63 - 1, help="the dry run's ceiling: requeue nothing dead-lettered after "
        "that count")] = None,
    operator: OperatorName = None, as_json: Json = False,
) -> None:
    """Redeliver dead deliveries by filter or by record id: counts first, then asks.

    ``--ceiling`` holds the run to a dry run's count (its ``ceiling``), as the API's and the
    console's confirmation do: a delivery dead-lettered since is left for the next decision.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from gateway.ops.common import require_reason
    from gateway.ops.deliveries import reprocess

    actor = terminal_actor(operator)
    with _coded():
        if not dry_run:  # asked before the count and the question, not after the operator's yes
            reason = require_reason(reason)
        flt = _filter(status, adapter, partner, error_code, since, until, ids)
        engine = _engine()
        counted = reprocess(engine, flt, dry_run=True, reason=reason, actor=actor,
                            ceiling=ceiling)
        if dry_run:
            if as_json:
                _print_json(counted.as_dict())
            else:
                console.print(f"{counted.matched} dead deliveries match (dry run; nothing "
                              f"changed); to requeue exactly these: --ceiling {counted.ceiling}")
            return
        if not yes and counted.matched and not typer.confirm(
                f"Requeue {counted.matched} dead deliveries? 重新投递 {counted.matched} 条？",
                err=True):
            err.print("aborted; nothing changed")
            raise typer.Exit(1)
        with Progress(TextColumn("[bold]requeueing"), BarColumn(), MofNCompleteColumn(),
                      console=err, disable=as_json or counted.matched < 2) as bar:
            task = bar.add_task("requeue", total=counted.matched)
            update: Callable[[int, int], None] = lambda done, total: bar.update(  # noqa: E731
                task, completed=done, total=total)
            result = reprocess(engine, flt, dry_run=False, reason=reason, actor=actor,
                               progress=update, ceiling=counted.ceiling)
    if as_json:
        _print_json(result.as_dict())
    else:
        console.print(f"matched {result.matched}, requeued [green]{result.requeued}[/green], "
                      f"superseded {result.superseded} (run {result.reprocess_id}, "
                      f"by {escape(actor)})")


@conflicts_app.command("list")
def conflicts_list(limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
                   cursor: Annotated[str | None, typer.Option()] = None,
                   as_json: Json = False) -> None:
    """Open conflicts, oldest first."""
    from gateway.ops.records import list_conflicts

    with _coded(), snapshot(_engine()) as conn:
        page = list_conflicts(conn, cursor=cursor, limit=limit)
    if as_json:
        _print_json(page)
        return
    table = Table("record", "partner", "source id", "hours", "conflicts with", "their hours",
                  "year", title=f"冲突 conflicts ({page['total']})")
    for c in page["items"]:
        table.add_row(escape(c["record_id"]), escape(c["partner_id"]),
                      escape(c["source_record_id"]), c["hours"] or "",
                      escape(c["conflicts_with"] or ""), c["other_hours"] or "", str(c["year"]))
    console.print(table)
    if page["next"]:
        console.print(f"more: --cursor {page['next']}")


@conflicts_app.command("resolve")
def conflicts_resolve(
    record_id: Annotated[str, typer.Argument(help="the conflicting record")],
    keep: Annotated[str, typer.Option(help="this (forward it; the other is withdrawn) | existing")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit trail)")],
    operator: OperatorName = None, as_json: Json = False,
) -> None:
    """Resolve a conflict by choosing a version."""
    from gateway.cli.common import _settings
    from gateway.ops.records import resolve_conflict

    with _coded():
        result = resolve_conflict(_engine(), _settings(), record_id, keep=keep, reason=reason,
                                  actor=terminal_actor(operator))
    if as_json:
        _print_json(result)
    else:
        console.print_json(data=result)
