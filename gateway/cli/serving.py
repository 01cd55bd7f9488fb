"""``ce-gateway serve`` and ``worker``: the long-running processes of a deployment.

``serve`` runs the HTTP API and, unless ``--no-worker``, the background half in the same
process; ``worker`` runs the background half alone (delivery, batch files, scheduled jobs)
beside ``serve --no-worker`` replicas.  Both refuse to start what cannot work (exit 2): a
store that is unreachable, behind this code or keyed with another PERSON_KEY_SECRET, and
``serve`` the development SECRET_KEY on an address beyond this machine.

May touch: everything the API (:func:`gateway.api.app.create_app`) and
:class:`gateway.runtime.Background` touch; here itself only the start-up checks of
:mod:`gateway.cli.common`.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Annotated

import typer
from rich.markup import escape

from gateway.cli.common import _engine, _settings, _setup_logging, _warn_dev_person_key, err
from gateway.config import DEV_SECRET_KEY


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def serve(host: str = "127.0.0.1", port: int = 8000,
          no_worker: Annotated[bool, typer.Option("--no-worker", help="HTTP only; delivery runs in `worker` processes")] = False,
          ) -> None:
    """Run the gateway HTTP server (and, unless --no-worker, the delivery worker)."""
    import uvicorn

    from gateway.api.app import create_app

    settings = _settings()
    _setup_logging(settings)
    if settings.secret_key.get_secret_value() == DEV_SECRET_KEY:
        if not _loopback(host):
            err.print(f"[red]CE_GATEWAY_SECRET_KEY is the development default, which anyone with "
                      f"the source knows; set your own before serving on {escape(host)}.[/red]")
            raise typer.Exit(2)
        logging.getLogger("gateway").warning("CE_GATEWAY_SECRET_KEY is the development default: partner secrets are "
                    "sealed with a public key; set your own before serving beyond this machine")
    _warn_dev_person_key(settings)
    # Fail fast on an unreachable store, one behind this code (PostgreSQL: `db upgrade` was not
    # run; SQLite is migrated here) or a wrong PERSON_KEY_SECRET (exit 2), as `worker` does;
    # the app makes its own engine and checks the key again.
    _engine(settings).dispose()
    uvicorn.run(create_app(settings, run_worker=not no_worker, migrate=False), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=10)


def worker(
    metrics_port: Annotated[int, typer.Option(help="serve this process's /metrics here (0: none)")] = 0,
    metrics_host: Annotated[str, typer.Option(help="address for --metrics-port")] = "127.0.0.1",
) -> None:
    """Run the background half without HTTP: delivery, batch files, scheduled jobs.

    Beside ``serve --no-worker`` replicas; several may share one PostgreSQL store (outbox
    batches and batch files are claimed by lease, scheduled jobs run once cluster-wide).
    ``--metrics-port`` exposes what only this process knows (its delivery attempts and
    latency, batch rows, circuit state); the store's gauges come from any replica's /metrics.
    """
    import signal
    import threading

    from gateway.runtime import Background

    settings = _settings()
    _setup_logging(settings)
    # The store first: unreachable, the worker exits 2 with one line instead of logging a
    # traceback a cycle from every thread while a supervisor sees it "running".
    _warn_dev_person_key(settings)
    engine = _engine(settings)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    started: list[Background] = []
    if metrics_port:  # listening before any work starts, so no delivery goes unscraped
        from prometheus_client import start_http_server

        from gateway.metrics import build_registry

        # The Background is known before it starts its threads: a scrape right after the
        # worker logs that it runs already finds its circuit.
        registry = build_registry(lambda: started[0].worker if started else None)
        start_http_server(metrics_port, addr=metrics_host, registry=registry)
    background = Background(engine, settings)
    started.append(background)
    background.start()
    try:
        while not stopping.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        background.stop()
        background.engine.dispose()
