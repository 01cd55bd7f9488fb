"""``ce-gateway``: the command line of the gateway (Typer + Rich).

Every command reads the one :class:`~gateway.config.Settings` (``CE_GATEWAY_*`` environment);
commands meant for scripts take ``--json``.

This module only builds the command tree, in the order ``--help`` lists it; the commands live
in rooms by what they are for, each saying what it may touch:

======================  ============================================================
:mod:`.serving`         ``serve``, ``worker``: the long-running processes
:mod:`.intake`          ``ingest``, ``revalidate``, ``pull``, ``reference``
:mod:`.reports`         ``reconcile``, ``compliance``
:mod:`.accounts`        ``partner``, ``operator``: credentials added, listed, rotated, revoked
:mod:`.admin`           ``db``, ``audit``, ``retention``, ``alerts``
:mod:`.mock`            ``mock``, ``demo``
:mod:`gateway.ops`      ``deliveries``, ``conflicts``, ``records`` (:mod:`gateway.ops.commands`)
:mod:`.common`          what they share: settings, the store's engine, coded refusals
======================  ============================================================

Heavy modules (the API, SQLAlchemy's dialects, the pipeline) are imported inside the commands,
so ``ce-gateway --help`` and each command start fast.
"""

from __future__ import annotations

import typer

from gateway.cli import accounts, admin, intake, mock, reports, serving
from gateway.ops import commands as ops_commands

app = typer.Typer(help="CE Gateway — 青海省继续教育学时对接网关", no_args_is_help=True)
app.command()(serving.serve)
app.command()(serving.worker)
app.command()(intake.ingest)
app.command()(reports.reconcile)
app.command("compliance")(reports.compliance_cmd)
app.command()(mock.demo)
app.command()(intake.revalidate)
app.add_typer(admin.db_app, name="db")
app.add_typer(accounts.partner_app, name="partner")
app.add_typer(accounts.operator_app, name="operator")
app.add_typer(admin.audit_app, name="audit")
app.add_typer(mock.mock_app, name="mock")
app.add_typer(intake.pull_app, name="pull")
app.add_typer(intake.reference_app, name="reference")
# deliveries list|show|reprocess, conflicts list|resolve (issue 5): gateway/ops/commands.py
app.add_typer(ops_commands.deliveries_app, name="deliveries")
app.add_typer(ops_commands.conflicts_app, name="conflicts")
app.add_typer(ops_commands.records_app, name="records")
app.add_typer(admin.retention_app, name="retention")
app.add_typer(admin.alerts_app, name="alerts")
