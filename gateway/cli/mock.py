"""Stand-ins for the partners, and the demo run against them: ``ce-gateway mock …``, ``demo``.

``mock ce-system`` (the management system's intake and reference API), ``mock cadre-college``
(the college's paged completions) and ``mock webhook-sink`` (a WeCom/DingTalk robot) are the
real HTTP servers of :mod:`mock_partners`, with faults to inject at start or while they run.
``demo`` runs the whole flow end to end against them, on SQLite (:mod:`gateway.demo`).

May touch: nothing of a deployment.  The mocks keep what they receive in memory; the demo
makes its own store under ``var/demo-<time>/`` and removes it unless ``--keep``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.cli.common import console

mock_app = typer.Typer(help="Mock partner systems for tests and the demo", no_args_is_help=True)


@mock_app.command("ce-system")
def mock_ce_system(
    port: int = 8780, host: str = "127.0.0.1",
    error_rate: Annotated[float, typer.Option(help="share of requests answered 503, not applied")] = 0.0,
    latency_ms: Annotated[int, typer.Option(help="added to every intake request")] = 0,
    rate_limit_every: Annotated[int, typer.Option(help="every Nth request answers 429")] = 0,
    lost_reply_rate: Annotated[float, typer.Option(help="share applied, then answered 503")] = 0.0,
    outage_seconds: Annotated[float, typer.Option(
        help="an outage window from start: every request answers 503 for this long")] = 0.0,
    retry_after: Annotated[str, typer.Option(
        help='Retry-After sent with 429s and outage 503s: seconds or an HTTP date ("" = none)')] = "1",
    duplicate_receipts: Annotated[bool, typer.Option(help="each receipt appears twice")] = False,
    replay_conflict: Annotated[bool, typer.Option(help="a replayed key answers 409")] = False,
    reject_title_marker: Annotated[str, typer.Option(
        help="a record whose title holds it is rejected")] = "[REJECT]",
    seed: int | None = None,
) -> None:
    """Run the mock CE management system (intake + reference API) with fault injection.

    Every fault can also be changed while it runs: ``POST /_mock/faults`` with a JSON object
    of fields (``outage_seconds`` opens an outage window from now).
    """
    from mock_partners.ce_system import Faults, serve

    faults = Faults(error_rate=error_rate, latency_ms=latency_ms, rate_limit_every=rate_limit_every,
                    lost_reply_rate=lost_reply_rate, retry_after=retry_after,
                    duplicate_receipts=duplicate_receipts, replay_conflict=replay_conflict,
                    reject_title_marker=reject_title_marker, seed=seed)
    if outage_seconds > 0:
        faults.start_outage(outage_seconds)
    serve(host=host, port=port, faults=faults)


@mock_app.command("cadre-college")
def mock_cadre_college(
    port: int = 8781, host: str = "127.0.0.1", seed: int = 1,
    initial: int = 500, growth_per_call: int = 0,
    error_rate: Annotated[float, typer.Option(help="share of page requests answered 503")] = 0.0,
    fail_next: Annotated[int, typer.Option(help="the first N page requests answer 503")] = 0,
    rate_limit_every: Annotated[int, typer.Option(help="every Nth page request answers 429")] = 0,
    retry_after: Annotated[str, typer.Option(
        help='Retry-After sent with 429s and 503s ("" = none)')] = "1",
    latency_ms: Annotated[int, typer.Option(help="added to every page request")] = 0,
    outage: Annotated[bool, typer.Option(help="every page request answers 503")] = False,
    bad_item_every: Annotated[int, typer.Option(
        help="every Nth completion has a broken id check digit")] = 0,
) -> None:
    """Run the mock Cadre Network College (paged completions with pinyin keys) with faults.

    Every fault can also be changed while it runs: ``POST /_mock/faults`` with a JSON object.
    """
    from mock_partners.cadre_college import Faults, serve

    faults = Faults(error_rate=error_rate, fail_next=fail_next, rate_limit_every=rate_limit_every,
                    retry_after=retry_after, latency_ms=latency_ms, outage=outage,
                    bad_item_every=bad_item_every, seed=seed)
    serve(host=host, port=port, seed=seed, initial=initial, growth_per_call=growth_per_call,
          faults=faults)


@mock_app.command("webhook-sink")
def mock_webhook_sink(port: int = 8782, host: str = "127.0.0.1") -> None:
    """Run a mock WeCom/DingTalk robot webhook that keeps what it receives (GET /_mock/received)."""
    from mock_partners.webhook_sink import serve

    serve(host=host, port=port)


def demo(records: int = 300, keep: bool = False) -> None:
    """End to end on SQLite: mock with faults, gateway, a partner, records, a summary."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(console, n_records=records, keep=keep))
