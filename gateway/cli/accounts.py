"""Partner and operator credentials from a terminal: ``ce-gateway partner …`` and ``operator …``.

``add`` registers (:mod:`gateway.accounts`); ``list``, ``rotate-secret``, ``disable``,
``enable``, ``revoke`` and ``reissue`` are their later life (:mod:`gateway.credentials`).  A
secret or token is printed once, when made, and never again (``list`` shows neither).  Actions
are audited under ``cli:<OS user>`` with the ``--reason`` given.  A refusal prints its English
and Chinese message and exits 2 (bad input: a blank reason is ``SCHEMA``) or 1 (``NOT_FOUND``).

May touch: ``partners`` and ``operators``; the audit trail (appended to by every action).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape

from gateway.cli.common import _coded, _engine, _refused, _settings, console
from gateway.errors import PayloadRejected
from gateway.ops import commands as ops_commands

partner_app = typer.Typer(help="Partner credentials: add, list, rotate-secret, disable, enable",
                          no_args_is_help=True)
operator_app = typer.Typer(help="Operator tokens: add, list, revoke, reissue", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
PartnerId = Annotated[str, typer.Option("--id", help="partner id, e.g. qh-base-001")]
OperatorName = Annotated[str, typer.Option("--name", help="the operator's name")]
Reason = Annotated[str, typer.Option(help="why (kept in the audit trail)")]


@contextmanager
def _refusals() -> Iterator[None]:
    """A coded refusal instead of a traceback: exit 2 for bad input, 1 for ``NOT_FOUND``."""
    try:
        yield
    except PayloadRejected as exc:
        _coded(exc.code, exc.field, exc.message, exc.message_zh)
        raise typer.Exit(2 if exc.status_code == 422 else 1) from exc


def _when(at: datetime | None) -> str:
    """UTC to the minute, as the tables' headers say (``--json`` gives the full time)."""
    return at.strftime("%Y-%m-%d %H:%M") if at else ""


# -- partners -------------------------------------------------------------------------------------

@partner_app.command("add")
def partner_add(
    id: PartnerId,
    adapter: Annotated[str, typer.Option(help="canonical | training_base | health | finance")],
    base_code: Annotated[str | None, typer.Option(
        help="training base code this partner may submit for (required for training_base)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register a partner; prints its app key and secret ONCE."""
    from gateway.accounts import RegistrationRefused, add_partner
    from gateway.secrets_box import SecretBox

    settings = _settings()
    try:
        p = add_partner(_engine(settings), SecretBox(settings.secret_key.get_secret_value()),
                        id, adapter, base_code, actor=ops_commands.terminal_actor())
    except RegistrationRefused as exc:
        raise _refused(exc) from exc
    out = {"partner_id": p.partner_id, "app_key": p.app_key, "secret": p.secret}
    if as_json:
        print(json.dumps(out))
    else:
        console.print(f"partner [bold]{escape(p.partner_id)}[/bold] ({adapter})\n"
                      f"  app key: {p.app_key}\n"
                      f"  secret:  {p.secret}\n[yellow]The secret is shown once; store it now.[/yellow]")


@partner_app.command("list")
def partner_list(as_json: Json = False) -> None:
    """Every partner: adapter, base code, app key, enabled or disabled, created (no secret)."""
    from rich.table import Table

    from gateway.credentials import list_partners

    found = list_partners(_engine(_settings()))
    if as_json:
        print(json.dumps([p.as_dict() for p in found], ensure_ascii=False))
        return
    table = Table(title=f"合作方 partners ({len(found)})")
    for header in ("partner", "adapter", "base code", "app key", "state 状态 (UTC)",
                   "created (UTC)"):
        table.add_column(header, overflow="fold")  # ids wrapped whole, never cut to "…"
    for p in found:
        state = ("[green]enabled 启用" if p.enabled
                 else f"[red]disabled 停用[/red] {_when(p.disabled_at)}".rstrip())
        table.add_row(escape(p.partner_id), p.adapter, escape(p.base_code or ""), p.app_key,
                      state, _when(p.created_at))
    console.print(table)


@partner_app.command("rotate-secret")
def partner_rotate_secret(id: PartnerId, reason: Reason, as_json: Json = False) -> None:
    """Give a partner a new secret (same app key), printed ONCE; the old one is refused at once."""
    from gateway.credentials import rotate_partner_secret
    from gateway.secrets_box import SecretBox

    settings = _settings()
    with _refusals():
        rotated = rotate_partner_secret(
            _engine(settings), SecretBox(settings.secret_key.get_secret_value()), id, reason,
            actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps(rotated.as_dict()))
        return
    console.print(f"partner [bold]{escape(rotated.partner_id)}[/bold]: new secret, same app key\n"
                  f"  app key: {rotated.app_key}\n"
                  f"  secret:  {rotated.secret}\n"
                  "[yellow]The secret is shown once; store it now. The old secret is refused "
                  "from now on.[/yellow]")
    if not rotated.enabled:
        console.print("[yellow]The partner is still disabled: `ce-gateway partner enable` lets "
                      "it in again.[/yellow]")


def _set_enabled(id: str, enabled: bool, reason: str, as_json: bool) -> None:
    from gateway.credentials import set_partner_enabled

    with _refusals():
        result = set_partner_enabled(_engine(_settings()), id, enabled, reason,
                                     actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps({**result.as_dict("partner_id"), "enabled": enabled}))
        return
    word = "enabled 已启用" if enabled else "disabled 已停用"
    console.print(f"partner {escape(id)} {word}" if result.changed
                  else f"partner {escape(id)} was already {word.split()[0]}; nothing changed")


@partner_app.command("disable")
def partner_disable(id: PartnerId, reason: Reason, as_json: Json = False) -> None:
    """Disable a partner: its signed requests are refused 401 UNAUTHENTICATED at once."""
    _set_enabled(id, False, reason, as_json)


@partner_app.command("enable")
def partner_enable(id: PartnerId, reason: Reason, as_json: Json = False) -> None:
    """Enable a disabled partner again (with the secret it has)."""
    _set_enabled(id, True, reason, as_json)


# -- operators ------------------------------------------------------------------------------------

@operator_app.command("add")
def operator_add(
    name: OperatorName,
    role: Annotated[str, typer.Option("--role", help="viewer | operator")] = "operator",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create an operator token (shown once; only its hash is stored)."""
    from gateway.accounts import RegistrationRefused, add_operator

    try:
        op, token = add_operator(_engine(_settings()), name, role, actor=ops_commands.terminal_actor())
    except RegistrationRefused as exc:
        raise _refused(exc) from exc
    if as_json:
        print(json.dumps({"name": op.name, "role": op.role, "token": token}))
    else:
        console.print(f"operator {escape(op.name)} ({op.role}) token: {token}")


@operator_app.command("list")
def operator_list(as_json: Json = False) -> None:
    """Every operator: role, created, revoked (no token)."""
    from rich.table import Table

    from gateway.credentials import list_operators

    found = list_operators(_engine(_settings()))
    if as_json:
        print(json.dumps([o.as_dict() for o in found], ensure_ascii=False))
        return
    table = Table("operator", "role", "created (UTC)", "revoked 已吊销 (UTC)",
                  title=f"运维人员 operators ({len(found)})")
    for o in found:
        table.add_row(escape(o.name), o.role, _when(o.created_at),
                      f"[red]{_when(o.revoked_at)}" if o.revoked_at else "")
    console.print(table)


@operator_app.command("revoke")
def operator_revoke(name: OperatorName, reason: Reason, as_json: Json = False) -> None:
    """End an operator's token and console sessions at once (reissue gives a new token)."""
    from gateway.credentials import revoke_operator

    with _refusals():
        result = revoke_operator(_engine(_settings()), name, reason,
                                 actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps(result.as_dict("name")))
    elif result.changed:
        console.print(f"operator {escape(name)} revoked 已吊销: its token and console sessions "
                      "are refused")
    else:
        console.print(f"operator {escape(name)} was already revoked at {_when(result.since)}; "
                      "nothing changed")


@operator_app.command("reissue")
def operator_reissue(name: OperatorName, reason: Reason, as_json: Json = False) -> None:
    """A new token for an operator (shown ONCE), revoked or not; the old token is refused."""
    from gateway.credentials import reissue_operator

    with _refusals():
        op, token = reissue_operator(_engine(_settings()), name, reason,
                                     actor=ops_commands.terminal_actor())
    if as_json:
        print(json.dumps({"name": op.name, "role": op.role, "token": token}))
    else:
        console.print(f"operator {escape(op.name)} ({op.role}) token: {token}\n"
                      "[yellow]The token is shown once; the old one is refused from now "
                      "on.[/yellow]")
