"""The ops web console at ``/ops`` (zh-CN, server-rendered Jinja2, plain HTML forms).

``session`` signs the login cookie and the CSRF tokens; ``web`` is the request plumbing (who is
asking, may they act); ``render`` renders and masks; ``routes`` is the APIRouter that
``gateway.api.app`` mounts, with ``actions`` (deliveries, records, conflicts), ``rejections``
and ``checks`` (revalidation, audit verification) included.  The console reads and acts only
through ``gateway.ops`` (deliveries, records, overview), ``gateway.batch_status``,
``gateway.reconcile``, ``gateway.revalidate`` and ``gateway.audit``: it holds no business logic
of its own.
"""
