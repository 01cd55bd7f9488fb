"""``GET /metrics``: Prometheus text exposition of this app's registry (gateway/metrics.py).

No token: serve it inside the network boundary only (docs/metrics-and-alerts.md).  The
registry is built per app by :func:`gateway.metrics.build_registry` and kept on
``app.state.metrics``, so several apps in one process each answer with their own.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response,
            summary="Prometheus metrics (no token: keep inside the network boundary)")
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
