"""Reports from a terminal: ``ce-gateway reconcile`` and ``compliance``.

``reconcile`` sets a partner's annual batch against its monthly ones, ``compliance`` shows one
person's year: the reports the API answers (:mod:`gateway.reconcile`,
:mod:`gateway.compliance`), printed as tables, or as JSON with ``--json``.

May touch nothing: each reads one snapshot of the store.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from gateway.cli.common import _engine, _refused, _settings, console
from gateway.errors import PayloadRejected


def _check_year(year: int) -> None:
    """A CE year the store can hold, as the API's paths take it (ops.common's bounds)."""
    from gateway.ops.common import FIRST_YEAR, LAST_YEAR

    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise _refused(PayloadRejected(
            "SCHEMA", field="year", detail=f"({year}: expected {FIRST_YEAR}-{LAST_YEAR})",
            detail_zh=f"（{year}：应在 {FIRST_YEAR}–{LAST_YEAR} 之间）"))


def reconcile(adapter: Annotated[str, typer.Argument(help="health | finance")],
              year: Annotated[int, typer.Argument()],
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Annual vs monthly batches: per month what the annual adds, corrects, conflicts, lacks."""
    from rich.table import Table

    from gateway.reconcile import ADAPTERS, CATEGORIES, report
    from gateway.store.db import snapshot

    if adapter not in ADAPTERS:
        raise _refused(PayloadRejected("SCHEMA", field="adapter", detail=(
            f"(reconciliation covers the monthly/annual partners: {', '.join(ADAPTERS)})"),
            detail_zh=f"（对账只适用于按月和按年报送的合作方：{'、'.join(ADAPTERS)}）"))
    _check_year(year)
    settings = _settings()
    with snapshot(_engine(settings)) as conn:
        result = report(conn, adapter, year, timezone=settings.timezone)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    table = Table(title=f"{adapter} {year} 年度与月度对账 (annual {result['annual_batch_id'] or '—'})")
    table.add_column("month")
    for c in CATEGORIES:
        table.add_column(c, justify="right")
    for m in result["months"]:
        table.add_row(m["month"], *(str(m[c]) for c in CATEGORIES))
    table.add_row("[bold]total", *(f"[bold]{result['totals'][c]}" for c in CATEGORIES))
    console.print(table)
    console.print(f"months never pushed: {', '.join(result['months_never_pushed']) or 'none'}")


def compliance_cmd(id_number: Annotated[str, typer.Argument(help="the person's identity number")],
                   year: Annotated[int, typer.Argument()],
                   as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One person's year: credited hours by category and type, what is missing, which records.

    Records whose last version sent the management system refused (DOWNSTREAM_REJECTED) are
    listed apart; what it still counts of an earlier version is in the totals.
    """
    from rich.table import Column, Table

    from gateway.compliance import check_person, report
    from gateway.store.db import snapshot

    _check_year(year)
    try:
        check_person(id_number)
    except PayloadRejected as exc:
        raise _refused(exc) from exc
    from gateway.person_keys import PersonKeys

    settings = _settings()
    with snapshot(_engine(settings)) as conn:
        result = report(conn, id_number, year, keys=PersonKeys(settings.person_key_secret))
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
        return
    console.print(f"{result['person']} {year}: credited {result['credited']} "
                  f"missing {result['missing']} ({'compliant' if result['compliant'] else 'not yet'})")
    if result["merged_from"] is not None:
        # 七(二): a deferred year computed together with this one; requirement and missing
        # are the years' together.
        console.print(f"merged from {result['merged_from']} (合并计算): requirement "
                      f"{result['requirement']}, of which counted there "
                      f"{result['merged_credited']}")
    if result["deferred_to"] is not None:
        console.print(f"deferred to {result['deferred_to']} (顺延): compliant is the merged "
                      f"judgement there")
    cover = result["professional_covered_by"]
    if cover is not None:
        console.print(f"professional requirement covered by {escape(cover['source_record_id'])} "
                      f"({cover['year']}, R7 四(二)5)")
    for note in result["notes"]:
        console.print(f"  {note['code']}: {escape(note['message'])} / {escape(note['message_zh'])}")
    table = Table("record", "partner", "category", "type", "hours", "credited", "delivery")
    for r in result["records"]:
        table.add_row(escape(r["source_record_id"]), escape(r["partner_id"]), r["category"],
                      r["activity_type"], r["hours"], r["credited_hours"],
                      " ".join(x for x in (r["delivery"] or "—", r["delivery_code"]) if x))
    console.print(table)
    if result["not_counted"]:
        # What the management system refused for good: out of the totals above.
        refused = Table("record", "partner", "type", "hours", "code", "reason",
                        Column("still counted", no_wrap=True),
                        title="not counted (refused by the management system; what it still "
                              "counts of an earlier version is in the totals) "
                              "未计入（管理系统拒收；其仍计入的早先版本学时已计入合计）",
                        style="red")
        for r in result["not_counted"]:
            # Partner ids and the downstream's reason are data, not Rich markup ("[REJECT]").
            there = "—" if r["applied_version"] is None else (
                f"v{r['applied_version']} {r['applied_hours'] or '?'} h")
            refused.add_row(escape(r["source_record_id"]), escape(r["partner_id"]),
                            r["activity_type"], r["hours"], r["delivery_code"], escape(r["reason"]),
                            there)
        console.print(refused)
    if result["refused_changes"]:
        # Withdrawals and 0-hour versions it refused: it still counts the earlier hours, and so
        # do the totals above.
        # "still counted": the version it applied and its hours, never cut short.
        changes = Table("record", "partner", "here", "refused", "code", "reason",
                        Column("still counted", no_wrap=True),
                        title="changes refused by the management system (it still counts the "
                              "version it applied, and so do the totals) "
                              "管理系统拒收的变更（仍计入其已接收的版本，已计入合计）",
                        style="yellow")
        for r in result["refused_changes"]:
            hours = "?" if r["applied_hours"] is None else r["applied_hours"]
            changes.add_row(escape(r["source_record_id"]), escape(r["partner_id"]), r["status"],
                            f"v{r['version']}", r["delivery_code"], escape(r["reason"]),
                            f"v{r['applied_version']} {hours} h")
        console.print(changes)
