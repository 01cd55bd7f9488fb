"""The ops web console at ``/ops`` (zh-CN, server-rendered Jinja2, plain HTML forms).

``session`` signs the login cookie and the CSRF tokens; ``views`` renders; ``routes`` is the
APIRouter that ``gateway.api.app`` mounts.  The console reads and acts only through
``gateway.ops`` (deliveries, records, overview), ``gateway.batches`` and ``gateway.reconcile``:
it holds no business logic of its own.
"""
